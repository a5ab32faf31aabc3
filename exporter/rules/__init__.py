"""The rules bundle: rendering ``rules/`` into the files and manifests a given setup loads."""
