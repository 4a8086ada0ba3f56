"""Container images (OCI and Docker) brought to the host as read-only bases of the image store.

One module a job: reference.py (image names and registry references), transfer.py (skopeo:
registry and archive transfer into the layer cache), cache.py (the layer cache, a shared OCI
layout), layout.py (manifests, configs and layer streams, verified against their digests),
layers.py (applying layers to a root tree, safely), rootfs.py (the tree as a raw ext4
file system), config.py (the image config as docker run reads it), importer.py (all of it in
order, leaving nothing behind on failure). Nothing is imported here, so the store can use
reference.py without pulling the rest in.
"""
