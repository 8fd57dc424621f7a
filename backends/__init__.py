"""Built-in backends, one folder each, registered through the ``q8bert`` entry-point group."""
