"""Built-in task plugins: the GLUE benchmark."""
