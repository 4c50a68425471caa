"""Where the images come from: input objects, listings of prefixes, globs and manifests, key ranges, the pre-flight check."""
