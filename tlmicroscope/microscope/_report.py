"""Report sections: LLM-Microscope panels."""
