"""Mutation testing of the core modules with mutmut: `make mutation` (see MUTATION.md).

Each module listed in `modules.toml` is mutated on its own, against its own unit tests only,
in a working directory `.mutation/<name>/` of its own (mutmut reads one configuration per
directory, and one per module is what keeps each module's test set small). Survivors judged
equivalent are listed, with the reason, in `equivalent.toml`.
"""
