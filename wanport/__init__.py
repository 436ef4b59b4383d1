"""The `wanport` command line: the top of the project, and its composition root.

One module per subcommand (`wanport.commands`), the argument groups they share (`wanport.args`), and
`wanport.cli.main`. This is the only place that chooses implementations for the user (which encoders,
which attention back-end) and hands them to the packages below: parity, jax_impl, torch_ref, weights,
kernels. It holds no model code.
"""
