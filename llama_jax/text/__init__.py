"""The tokenizer side of a checkpoint, shared by generation and training: chat templates rendered to token ids,
records to examples with loss masks (`Encoder`), and UTF-8-safe streamed decoding. Above `checkpoints`."""

from llama_jax.text.chat import StreamDecoder, chat_messages, render_chat
from llama_jax.text.encoder import Encoder, Example, encoder_for

__all__ = ["Encoder", "Example", "StreamDecoder", "chat_messages", "encoder_for", "render_chat"]
