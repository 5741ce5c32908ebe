"""The needle-in-a-haystack experiment behind `slowfast-adapter demo`."""
