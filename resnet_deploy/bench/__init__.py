"""``resnet-deploy bench``: which artifact to ship, and what it costs (see docs/bench.md).

``run_bench(paths, BenchOptions(...), data=..., progress=...)`` is the library entry point; it is
imported lazily so that ``import resnet_deploy.bench.options`` stays cheap.
"""


def __getattr__(name):
    if name == "run_bench":
        from resnet_deploy.bench.run import run_bench

        return run_bench
    if name == "BenchOptions":
        from resnet_deploy.bench.options import BenchOptions

        return BenchOptions
    raise AttributeError(name)


__all__ = ["run_bench", "BenchOptions"]
