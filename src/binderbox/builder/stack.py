"""Pinned versions of what every image gets, so the shared layers are reproducible."""

# The Jupyter server stack: one layer, identical for all repositories on one base.
SERVER_STACK = (
    "jupyter-server==2.21.1",
    "jupyterlab==4.6.6",
    "notebook==7.6.5",
    "ipykernel==7.4.0",
    "jupyterhub==6.1.1",
)

# uv, installed into every base from PyPI.
UV_VERSION = "0.13.9"

# The user that binderbox's own base images already have, owning the server stack.
BASE_USER_ID = 1000
BASE_USER_NAME = "jovyan"

# Where the Python environment of every image lives.
VENV = "/srv/venv"
# Where uv keeps its cache in the build steps that mount it (a BuildKit cache mount, never
# in the image, which only keeps the empty, root-owned mount point).
UV_CACHE = "/var/cache/binderbox/uv"
# Where uv itself is installed in the image.
UV_HOME = "/opt/binderbox-uv"
