"""The ``ddpm`` command line: the root (``commands.main``) over the core's commands and the service's."""
