"""Number formats: the precision policy (autocast, scaler), pure bf16, fp8."""
