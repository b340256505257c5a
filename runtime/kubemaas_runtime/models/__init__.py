"""Model kinds: one class per format, all following `base.Model`."""
