"""Developer tools that are neither services nor tests (mutation testing)."""
