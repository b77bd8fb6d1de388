"""Exceptions that the CLI turns into one-line messages and a non-zero exit."""


class LoraregError(Exception):
    """Base class: anything lorareg reports to a user as a plain message."""

    exit_code = 1


class InputError(LoraregError):
    """An input file, folder or argument that cannot be used as given."""

    exit_code = 2


class RegistryError(LoraregError):
    """A schema or adapter data file is invalid."""

    exit_code = 3


class DetectionError(LoraregError):
    """No known format or family fits the file."""

    exit_code = 4


class ConversionError(LoraregError):
    """The requested conversion cannot be done without loss the user did not allow."""

    exit_code = 5
