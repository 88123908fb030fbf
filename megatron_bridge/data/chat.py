"""Chat-template tokenization with response-only loss masks: the one place that decides which
tokens are trained on.

For every supervised assistant turn k the template is rendered twice — the conversation before
it with the generation prompt (`prompt_k`), and the conversation through it (`turn_k`). The
supervised tokens of turn k are exactly `tokens(turn_k)[len(tokens(prompt_k)):]`: the assistant
content and whatever the template closes the turn with (the EOS for DeepSeek-R1's template).
This is checked, not assumed, on every sample:
- `prompt_k` renders as a text prefix of `turn_k`, and `turn_k` of the full conversation;
- the prompt's tokens are a token prefix of the turn's, and the turn's of the full sample's (a
  token merging across the boundary would make the mask wrong);
- the assistant's content appears whole inside its supervised text (a template that rewrites
  answers, like R1's that cuts the reasoning before `</think>`, cannot be trained on).
Any failure is a `TemplateError` naming the fix. Rendering is transformers' own
(`render_jinja_template`, with the tokenizer's special tokens, as `apply_chat_template` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from settings.errors import UserError

Messages = list[dict[str, str]]


class TemplateError(UserError):
    """The tokenizer/chat template cannot produce a correct loss mask (one line, names the fix)."""


class ChatMasker:
    """Renders and tokenizes conversations into (token ids, loss mask) pairs."""

    def __init__(self, tokenizer_dir: Path, assistant_turns: str = "all",
                 supervise_control_token: bool = True,
                 control_tokens: Sequence[str] = ("<think>", "<short>")):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        template = hf.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise TemplateError(f"the tokenizer in {tokenizer_dir} has no chat template; set "
                                "patch_tokenizer.chat_template_file")
        self.template = template
        self.template_kwargs = dict(hf.special_tokens_map)
        self.backend = hf.backend_tokenizer
        self.backend.no_padding()
        self.backend.no_truncation()
        self.vocab_size = len(hf)
        self.eos_id = hf.eos_token_id
        self.pad_id = hf.pad_token_id
        self.assistant_turns = assistant_turns
        self.control_ids = {ids[0] for t in control_tokens
                            if len(ids := hf.encode(t, add_special_tokens=False)) == 1}
        if not supervise_control_token and len(self.control_ids) < len(control_tokens):
            raise TemplateError(f"control tokens {list(control_tokens)} are not all single tokens "
                                "of this tokenizer; check patch_tokenizer.renames")
        self.supervise_control_token = supervise_control_token
        self._hf = hf

    def spec(self) -> dict[str, Any]:
        """Everything a worker process needs, picklable: rebuilding from it avoids loading
        transformers' AutoTokenizer (which imports torch) in every worker."""
        return {"template": self.template, "template_kwargs": self.template_kwargs,
                "tokenizer": self.backend.to_str(), "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "assistant_turns": self.assistant_turns,
                "control_ids": sorted(self.control_ids),
                "supervise_control_token": self.supervise_control_token}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ChatMasker":
        from tokenizers import Tokenizer

        self = cls.__new__(cls)
        self.template, self.template_kwargs = spec["template"], spec["template_kwargs"]
        self.backend = Tokenizer.from_str(spec["tokenizer"])
        self.vocab_size, self.eos_id = spec["vocab_size"], spec["eos_id"]
        self.assistant_turns = spec["assistant_turns"]
        self.control_ids = set(spec["control_ids"])
        self.supervise_control_token = spec["supervise_control_token"]
        self._hf = None
        return self

    # -- text ------------------------------------------------------------------------------------
    def render(self, conversations: list[Messages], add_generation_prompt: bool) -> list[str]:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=conversations, chat_template=self.template,
                                            add_generation_prompt=add_generation_prompt,
                                            **self.template_kwargs)
        return rendered

    def _turns(self, messages: Messages) -> list[int]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        return turns if self.assistant_turns == "all" else turns[-1:]

    def texts(self, batch: list[Messages]) -> list[tuple[str, list[tuple[str, str]]]]:
        """Per sample: the full text and, per supervised turn, (prompt_k, turn_k) texts."""
        plan = [(s, k) for s, messages in enumerate(batch) for k in self._turns(messages)]
        full = self.render(batch, add_generation_prompt=False)
        prompts = self.render([batch[s][:k] for s, k in plan], add_generation_prompt=True)
        # The last turn's conversation is the whole sample when it ends with that turn.
        partial = [(s, k) for s, k in plan if k + 1 < len(batch[s])]
        turn_texts = dict(zip(partial, self.render([batch[s][:k + 1] for s, k in partial],
                                                   add_generation_prompt=False)))
        out: list[tuple[str, list[tuple[str, str]]]] = [(text, []) for text in full]
        for (s, k), prompt in zip(plan, prompts):
            out[s][1].append((prompt, turn_texts.get((s, k), full[s])))
        return out

    # -- tokens ----------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        unique = list(dict.fromkeys(texts))
        # (encode_batch_fast, without offsets, measured slower with tokenizers 0.23)
        encodings = self.backend.encode_batch(unique, add_special_tokens=False)
        return {t: np.asarray(e.ids, dtype=np.int32) for t, e in zip(unique, encodings)}

    def encode(self, batch: list[Messages]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids int32, loss mask uint8) per conversation; raises TemplateError."""
        plans = self.texts(batch)
        ids = self._encode([t for full, turns in plans for t in (full, *[x for p in turns for x in p])])
        out = []
        for messages, (full, turns) in zip(batch, plans):
            tokens = ids[full]
            mask = np.zeros(len(tokens), dtype=np.uint8)
            for k, (prompt, turn) in zip(self._turns(messages), turns):
                start, end = self._span(prompt, turn, full, ids, messages[k]["content"])
                mask[start:end] = 1
                if not self.supervise_control_token and tokens[start] in self.control_ids:
                    mask[start] = 0
            mask[0] = 0  # the first token is never a target: nothing precedes it in its sample
            out.append((tokens, mask))
        return out

    def _span(self, prompt: str, turn: str, full: str, ids: dict[str, np.ndarray],
              content: str) -> tuple[int, int]:
        if content.strip() not in turn:
            raise TemplateError(
                "the chat template rewrites the assistant answer (e.g. DeepSeek-R1's cuts the "
                "reasoning before </think>); set patch_tokenizer.keep_reasoning: true or use "
                "another template")
        if not turn.startswith(prompt) or not full.startswith(turn):
            raise TemplateError(
                "the chat template does not render the prompt (with its generation prompt) as a "
                "prefix of the conversation, so the answer cannot be located (e.g. R1's generation "
                "prompt forces <think>\\n); set patch_tokenizer.generation_prompt_suffix or "
                "patch_tokenizer.chat_template_file")
        if content.strip() not in turn[len(prompt):]:
            raise TemplateError("the chat template renders the assistant answer outside its turn; "
                                "use another template (patch_tokenizer.chat_template_file)")
        p, t, f = ids[prompt], ids[turn], ids[full]
        if not (len(p) <= len(t) <= len(f) and np.array_equal(t[:len(p)], p)
                and np.array_equal(f[:len(t)], t)):
            raise TemplateError(
                "a token merges across the prompt/answer boundary of the chat template, so the "
                "loss mask would be wrong; end the generation prompt with a special token or a "
                "newline (patch_tokenizer.generation_prompt_suffix / chat_template_file)")
        if len(t) == len(p):
            raise TemplateError("the chat template renders an empty assistant turn")
        return len(p), len(t)

    def check(self) -> None:
        """Fail fast, before any data is read, if the template cannot be masked at all."""
        probe = [{"role": "user", "content": "What is 1+1?"},
                 {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\nThe answer is 2."}]
        expected = self._hf.apply_chat_template(probe, tokenize=False)
        if self.render([probe], add_generation_prompt=False)[0] != expected:
            raise TemplateError("rendering differs from transformers' apply_chat_template")
        self.encode([probe])

    def end_of_turn_id(self) -> int:
        """The token the template closes an assistant turn with (trailing whitespace skipped):
        generation must stop on it, whatever the tokenizer calls its EOS."""
        probe = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
        ids = self._hf.apply_chat_template(probe, tokenize=False)
        tokens = self.backend.encode(ids, add_special_tokens=False).ids
        for token in reversed(tokens):
            if self._hf.decode([token]).strip():
                return int(token)
        raise TemplateError("the chat template renders an assistant turn with no closing token")

    def describe(self) -> dict[str, Any]:
        """`base_vocab_size`: the vocabulary without added tokens (special tokens, ChatML's),
        which alone must fit the model's embedding: added ones may grow it."""
        return {"eos_id": self.eos_id, "vocab_size": self.vocab_size,
                "base_vocab_size": self.backend.get_vocab_size(with_added_tokens=False),
                "control_ids": sorted(int(i) for i in self.control_ids)}
