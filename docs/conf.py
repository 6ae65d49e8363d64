"""Sphinx configuration of the hesscale documentation (``sphinx-build -W docs docs/_build``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

project = "hesscale"
author = "The hesscale developers"
copyright = "2026, The hesscale developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
# laplace-torch imports torchmetrics, which imports torchvision: the optional extra must not
# decide whether the site builds, so its base class is mocked while the pages are written.
autodoc_mock_imports = ["laplace"]
html_theme = "alabaster"
html_theme_options = {"description": "Hessian diagonals at the cost of a gradient"}

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/example_",
    "download_all_examples": False,
    "remove_config_comments": True,
}
