"""Deployment: the image, compose and Kubernetes manifests beside this file, and ``deploy.local``, which
runs the same several-nodes topology on this machine (deploy/README.md)."""
