"""Old import path of the ``tlmicroscope`` command, kept working (now ``tlmicroscope.app.cli``)."""

from tlmicroscope.app.cli import (
    add_model_args,
    check_output_path,
    load_from_args,
    log,
    main,
    read_text_arg,
)

__all__ = ["add_model_args", "check_output_path", "load_from_args", "log", "main", "read_text_arg"]


if __name__ == "__main__":  # python -m tlmicroscope.cli (as the torchrun recipe uses)
    import sys

    sys.exit(main())
