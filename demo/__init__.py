"""`make run` (`python -m demo`): the whole stack on this machine, with a model whose answers a
person can read. See demo/__main__.py."""
