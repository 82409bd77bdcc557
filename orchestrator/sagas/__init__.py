"""The sagas of the shop, each a definition read top to bottom, and their domain helpers."""
