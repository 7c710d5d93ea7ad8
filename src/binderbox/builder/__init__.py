"""The builder: detect a repository's configuration, render a Dockerfile, build an image."""
