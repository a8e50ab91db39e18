"""Model backends. Policies are the only code that touches a model."""
