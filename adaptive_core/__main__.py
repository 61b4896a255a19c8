"""``python -m adaptive_core demo ...`` (the main job), ``python -m adaptive_core bench ...`` and
``python -m adaptive_core tune ...`` (same as ``python -m adaptive_core.tune``)."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("demo", "bench", "tune"):
        print("usage: python -m adaptive_core {demo,bench,tune} [options]   (-h after the command for its options)")
        return 2
    if argv[0] == "tune":
        from .tune.__main__ import main as tune_main
        return tune_main(argv[1:])
    if argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    from .bench.run import main as bench_main
    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
