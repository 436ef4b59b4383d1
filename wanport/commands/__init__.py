"""One module per `wanport` subcommand: `add_parser(subparsers)` registers it, `run(args)` runs it.

The modules are imported when `wanport` starts, so they import only what defining the options needs;
jax, torch and the models are imported inside `run` (each says what that saves, measured).
"""
