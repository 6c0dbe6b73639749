"""Serving: settings, the shared assistant, admission, feedback, tasks and the Gradio UI."""
