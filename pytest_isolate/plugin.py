"""pytest11 entry point of pytest-isolate (the plugin itself lands with its own issue)."""
