"""Training methods (one module each) over shared loop pieces (`loop`) and pure losses (`losses`)."""
