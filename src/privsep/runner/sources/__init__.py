"""Where definition files come from: discovery, the manifest, the bundle version, pinned copies."""
