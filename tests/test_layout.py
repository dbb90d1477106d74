"""The tree's own rules: the product apart from the lab, model families behind one seam, modules a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
PRODUCT = [*(REPO / "tinv").rglob("*.py"), *(REPO / "jobs").rglob("*.py")]
FAMILY_MODULES = {REPO / "tinv" / "families" / name for name in ("sd.py", "sdxl.py", "flux.py", "tiny.py")}
FAMILY_WORDS = ("UNet2DConditionModel", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "CLIPTextModel",
                "CLIPTokenizer", "text_encoder_2", "tokenizer_2", "add_time_ids", "time_ids", "text_embeds",
                "lora_unet_", "lora_te_", "lora_te1_", "clip_l", "clip_g", "emb_params", "string_to_param", "unet",
                "is_sdxl",
                "prediction_type", "scaling_factor", "get_velocity", "sdxl_base", "sd_v1",
                "FluxPipeline", "FluxTransformer2DModel", "T5EncoderModel", "t5xxl", "_pack_latents", "guidance_embeds",
                "flux1")
"""A family's classes and keys: none may be named outside the family modules (the benchmark's SD-shaped models
excepted: it measures those families by name)."""


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (``from lab import toyworld`` included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def named(path: Path) -> set[str]:
    """Every identifier and non-docstring string literal of ``path``'s code."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.alias):
            out.add(node.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.add(node.value)
    return out


def family_words(path: Path) -> set[str]:
    return {w for w in FAMILY_WORDS for n in named(path) if w in n}


def test_the_product_imports_nothing_of_the_lab():
    assert len(PRODUCT) > 20
    offenders = {str(p.relative_to(REPO)): n for p in PRODUCT
                 if (n := {m for m in imported(p) if m == "lab" or m.startswith("lab.")})}
    assert not offenders, offenders
    assert "lab.toyworld.world" in imported(REPO / "lab" / "toyworld" / "scorer.py")  # the check sees imports


def test_pip_install_gives_the_product_and_only_the_demos_model_of_the_lab():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["tinv*", "jobs*"]
    assert setuptools["package-data"] == {"tinv": ["assets/**/*"]}
    assert not (REPO / "tinv" / "toyworld").exists() and (REPO / "lab" / "toyworld" / "world.py").exists()
    shipped = {p.relative_to(REPO / "tinv" / "assets").parts[0] for p in (REPO / "tinv" / "assets").rglob("*")}
    assert shipped == {"toyworld"}  # the embedded demo model (with its scorer): nothing else of the lab


def test_outside_the_family_modules_no_core_module_names_a_familys_classes_or_keys():
    core = [p for p in PRODUCT if p not in FAMILY_MODULES and "bench" not in p.parts]
    offenders = {str(p.relative_to(REPO)): words for p in core if (words := family_words(p))}
    assert not offenders, offenders
    for module in FAMILY_MODULES - {REPO / "tinv" / "families" / "tiny.py"}:  # the check sees them where they are
        assert family_words(module), module


def test_every_family_implements_the_whole_interface():
    from typing import get_type_hints

    from tinv.families import Family, families

    wanted = {n for n in dir(Family) if not n.startswith("_")} | set(get_type_hints(Family))
    for name, family in families().items():
        missing = {n for n in wanted if not hasattr(family, n)}
        assert not missing, (name, missing)
        assert family.pipeline_class.__name__ == name  # detected from model_index.json's _class_name


def test_no_module_of_tinv_jobs_or_the_benchmark_is_over_400_lines():
    assert any("bench" in p.parts for p in PRODUCT)
    long = {str(p.relative_to(REPO)): n for p in PRODUCT if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
