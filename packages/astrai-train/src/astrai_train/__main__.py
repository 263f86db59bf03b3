"""`python -m astrai_train train ...`: the `astrai` command line as a module, so launchers that
run a module, like `torchrun -m astrai_train train ...`, can start it."""

from astrai_core.cli.main import app

if __name__ == "__main__":
    app(prog_name="astrai")
