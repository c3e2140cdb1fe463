"""Shipping a release: self-contained Docker build contexts (release, wheelhouse, lock), base images made
without a registry, the Docker engine, and checks of what a board or an image computes against this host.

* :mod:`edgepipe.ship.context`: ``edgepipe docker build``'s context, written whether or not an engine runs.
* :mod:`edgepipe.ship.wheels`: the image platform's wheels, pinned and hashed, downloaded on the host.
* :mod:`edgepipe.ship.engine`: ``docker build`` (buildx where present) and ``docker run``.
* :mod:`edgepipe.ship.base`: a Debian base image from the package mirror (no registry needed).
* :mod:`edgepipe.ship.verify`: the release's evaluation split, and a comparison of two runs' logits.
"""
