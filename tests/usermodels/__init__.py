"""A small package of a user's own models, for the `python` model kind in the tests."""
