"""A saga the product does not ship, added through the registry's extension point only.

The worked example of docs/extending.md: a loyalty saga with two new participant services
(``points`` and ``ledger``), registered by naming ``tests.extension.loyalty`` (and, for its second
version, ``tests.extension.loyalty_v2``) in ``SAGA_REGISTRY_MODULES``. Nothing in the kernel,
messaging or operations packages knows about it.
"""
