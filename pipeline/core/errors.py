"""The errors a user can act on. Every module may import this one; it imports nothing of ours."""


class PipelineError(RuntimeError):
    """An error the user can fix; the message names the file, row or key, and the fix."""


class ConfigError(PipelineError, ValueError):
    """A config value that cannot work: the message names the key and what it must be."""


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or corrupt. The message says how to fix it."""
