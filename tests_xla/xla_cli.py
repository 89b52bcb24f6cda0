"""``lit-longctx`` for the XLA:CPU tests' subprocesses: the CLI after the TESTS-ONLY accelerator patch."""

from tests_xla.helpers import patch_xla_accelerator

if __name__ == "__main__":
    patch_xla_accelerator(setattr)
    from lit_longctx.cli import console_main

    console_main()
