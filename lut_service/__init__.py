"""lut_service package."""
