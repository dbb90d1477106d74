"""The lab's benchmarks: measurements that need the toy world (its concepts, its scorer), kept out of the product's
``python -m jobs.bench``, whose pieces they use."""
