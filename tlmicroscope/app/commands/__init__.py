"""The subcommands of ``tlmicroscope``: each module has ``register(subparsers)``.

``tlmicroscope.app.cli.COMMAND_MODULES`` lists them in the order of the help text.
"""
