"""Small open_clip model configs shipped with the project (tests, offline quickstart)."""
