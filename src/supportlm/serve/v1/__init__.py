"""package: the OpenAI-compatible ``/v1`` API served beside the Gradio app."""
