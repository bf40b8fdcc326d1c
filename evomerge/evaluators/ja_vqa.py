"""Japanese visual question answering (JA-VG-VQA-500, JA-VLM-Bench-In-the-Wild) on a LLaVA model.

This follows the EvoVLM-JP evaluation (Akiba et al., 2024; Sakana AI's ``evomerge/eval``): the
VLM answers one question per image with beam search (5 beams, repetition penalty 1.5, up to 512
new tokens, Sakana's ``ja-shisa-vqa`` prompt), and each answer is scored by ROUGE-L on MeCab
words with the Japanese rule (:mod:`evomerge.evaluators.ja_rouge`: the ``sakana`` reading is
Sakana's published scoring, ``robust`` evomerge's). ``model_class: llava`` evaluates a
LLaVA-NeXT model as Sakana's ``LlavaForConditionalGeneration`` did (one image at the vision
tower's resolution, no anyres tiles).

:class:`JaVQAEvaluator` runs the whole thing on a LLaVA / LLaVA-NeXT model with its processor;
its ``score`` is the ROUGE-L with the Japanese rule (Sakana's ``rougeL_ja``).

One file for one task family (DESIGN.md), ~400 lines: images, prompts, the processor set-up
and the runner must agree on one image/prompt convention per model class, so they stay
together; the ROUGE scoring, which stands alone, is in :mod:`evomerge.evaluators.ja_rouge`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, describe
from evomerge.evaluators.base import Result, ScoresItems
from evomerge.evaluators.data import load_rows
from evomerge.evaluators.generation import load_pretrained, prepare_tokenizer
from evomerge.evaluators.ja_rouge import aggregate, rouge_scores, score_pairs
from evomerge.evaluators.langid import METRICS, JapaneseDetector, check_metric, ja_probability

# --------------------------------------------------------------------------------------------
# Data: images, questions, answers
# --------------------------------------------------------------------------------------------


def load_image(value: Any, *, root: Path | None = None, where: str = "image") -> Any:
    """A PIL RGB image from what a data set stores: a PIL image, raw bytes, a ``datasets``
    Image dict (``{"bytes": ..., "path": ...}``), or a file path (relative paths are tried
    against ``root``, the data file's folder, then the working directory)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return load_image(value["bytes"], root=root, where=where)
        if value.get("path"):
            return load_image(value["path"], root=root, where=where)
        raise EvomergeError(f"{where}: image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(value))) as im:
                return im.convert("RGB")
        except Exception as e:
            raise EvomergeError(f"{where}: image bytes cannot be decoded ({type(e).__name__})") from None
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        candidates = [path] if path.is_absolute() else [p for p in ((root / path) if root else None, path) if p]
        for candidate in candidates:
            if candidate.is_file():
                try:
                    with Image.open(candidate) as im:
                        return im.convert("RGB")
                except Exception as e:
                    raise EvomergeError(f"{where}: {candidate} is not a readable image "
                                        f"({type(e).__name__})") from None
        raise EvomergeError(f"{where}: image file {str(value)!r} does not exist")
    raise EvomergeError(f"{where}: cannot read an image from {type(value).__name__}")


def _data_spec(spec: dict) -> dict:
    """The data part of an evaluator spec (its ``data`` block, a path string, or top-level
    keys), with top-level ``limit``/``offset`` and field names applied unless set there."""
    if isinstance(spec.get("data"), str):
        data = {"path": spec["data"]}
    elif isinstance(spec.get("data"), dict):
        data = dict(spec["data"])
    else:
        data = dict(spec)
    for key in ("limit", "offset", "question_field", "answer_field", "image_field", "qas_field"):
        if key in spec and key not in data:
            data[key] = spec[key]
    return data


def load_examples(spec: dict) -> list[dict]:
    """VQA examples as ``[{"image": PIL.Image, "question": str, "answer": str}, ...]``.

    ``spec`` is a data spec (``path``/``hub``, ``config``, ``split``, ``offset``, ``limit``;
    see :mod:`evomerge.evaluators.data`) or an evaluator spec holding one under ``data``.
    Layouts read:

    - JA-VG-VQA-500: ``image`` and ``qas``, a list of ``{"question", "answer"}``; the first
      pair is used, as in Sakana's evaluation;
    - JA-VLM-Bench-In-the-Wild: ``image``, ``question``, ``answer``;
    - local JSONL / JSON / CSV / parquet with an image path (relative to the file) or bytes.

    Field mapping: ``image_field`` (default ``"image"``), ``question_field`` (``"question"``),
    ``answer_field`` (``"answer"``), ``qas_field`` (``"qas"``, used when the row has no
    question field).

        >>> load_examples({"hub": "SakanaAI/JA-VG-VQA-500", "split": "test"})  # doctest: +SKIP
    """
    data = _data_spec(spec)
    where = data.get("path") or data.get("hub")
    root = Path(str(data["path"])).expanduser().parent if data.get("path") else None
    rows = load_rows(data)
    i_field = data.get("image_field") or "image"
    q_field = data.get("question_field") or "question"
    a_field = data.get("answer_field") or "answer"
    qas_field = data.get("qas_field") or "qas"
    offset = int(data.get("offset") or 0)
    examples = []
    for i, row in enumerate(rows):
        where_row = f"{where}: row {offset + i + 1}"
        fields = ", ".join(map(str, row))
        if q_field in row:
            qa = row
        elif isinstance(row.get(qas_field), list) and row[qas_field]:
            qa = row[qas_field][0]
            if not isinstance(qa, dict):
                raise EvomergeError(f"{where_row}: {qas_field}[0] is not a mapping")
        else:
            raise EvomergeError(f"{where_row}: missing question field {q_field!r} and no non-empty "
                                f"{qas_field!r} list (fields: {fields}; set question_field)")
        if q_field not in qa or a_field not in qa:
            missing = q_field if q_field not in qa else a_field
            raise EvomergeError(f"{where_row}: missing field {missing!r} (fields: "
                                f"{', '.join(map(str, qa))}; set question_field / answer_field)")
        if i_field not in row or row[i_field] is None:
            raise EvomergeError(f"{where_row}: missing image field {i_field!r} (fields: {fields}; "
                                "set image_field)")
        image = load_image(row[i_field], root=root, where=f"{where_row}: {i_field}")
        examples.append({"image": image, "question": str(qa[q_field]), "answer": str(qa[a_field])})
    if not examples:
        raise EvomergeError(f"{where}: no examples (check the file, split, offset and limit)")
    return examples


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

PLAIN_PROMPT = "USER: <image>\n{question} ASSISTANT:"
# The prompt Sakana used for EvoVLM-JP (their "ja-shisa-vqa" template; the image goes first in
# the user turn): a Llama-2-style system block asking for a helpful answer about the image.
JA_SHISA_VQA_PROMPT = (
    "[INST] <<SYS>>\nあなたは役立つ、偏見がなく、検閲されていないアシスタントです。"
    "与えられた画像を下に、質問に答えてください。\n<</SYS>>\n\n<image>\n{question} [/INST]"
)
PROMPTS = {"plain": PLAIN_PROMPT, "ja-shisa-vqa": JA_SHISA_VQA_PROMPT}


def format_prompt(question: str, template: str, image_token: str = "<image>") -> str:
    """``template`` with ``{question}`` replaced; the literal ``<image>`` in the template becomes
    the processor's image token, and a template without one gets ``<image>\\n`` before the
    question (where LLaVA expects the image)."""
    if "{question}" not in template:
        raise EvomergeError("evaluator ja_vqa: the prompt template must contain '{question}'")
    if "<image>" not in template and image_token not in template:
        template = template.replace("{question}", "<image>\n{question}")
    return template.replace("<image>", image_token).replace("{question}", question)


def chat_prompt(processor: Any, question: str, system: str | None = None) -> str:
    """The prompt the processor's chat template builds for one user turn: an image, then the
    question (and an optional system turn), with the assistant cue appended."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


def load_processor(source: str | Path) -> Any:
    """The VLM's processor (tokenizer + image processor), set up for left-padded batches."""
    from transformers import AutoProcessor

    return prepare_processor(load_pretrained(AutoProcessor, source, "processor"))


def prepare_processor(processor: Any) -> Any:
    """Left padding and a pad token on the processor's tokenizer (batched generation needs both)."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise EvomergeError("evaluator ja_vqa: the processor has no tokenizer (is this a VLM folder?)")
    prepare_tokenizer(tokenizer)
    return processor


def llava_view(model: Any) -> Any:
    """The model as ``LlavaForConditionalGeneration`` sees it, the class Sakana evaluated
    EvoVLM-JP and LLaVA-1.6 with: a LLaVA-NeXT model's vision tower, projector, language model
    and head are shared (not copied) into a LLaVA model, and ``image_newline`` and the anyres
    grid are dropped, as ``LlavaForConditionalGeneration.from_pretrained`` does with a
    LLaVA-NeXT checkpoint. A LLaVA model is returned as it is."""
    import torch
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    if isinstance(model, LlavaForConditionalGeneration):
        return model
    if not isinstance(model, LlavaNextForConditionalGeneration):
        raise EvomergeError(f"evaluator ja_vqa: model_class: llava needs a LLaVA or LLaVA-NeXT model, "
                            f"got {type(model).__name__}")
    fields = model.config.to_dict()
    for key in ("model_type", "architectures", "image_grid_pinpoints", "transformers_version"):
        fields.pop(key, None)
    with torch.device("meta"):
        view = LlavaForConditionalGeneration(LlavaConfig(**fields))
    view.model.vision_tower = model.model.vision_tower
    view.model.multi_modal_projector = model.model.multi_modal_projector
    view.model.language_model = model.model.language_model
    view.lm_head = model.lm_head
    view.generation_config = model.generation_config
    return view.train(model.training)


def single_image_processor(processor: Any) -> Any:
    """A ``LlavaProcessor`` for the LLaVA view: one resize + center crop at the vision tower's
    resolution (a ``CLIPImageProcessor`` with the LLaVA-NeXT processor's size, crop, resampling
    and normalisation), so each image is ``(crop / patch)^2`` tokens instead of anyres tiles.
    A processor that already makes single images is returned as it is."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = processor.image_processor
    if not hasattr(image_processor, "image_grid_pinpoints"):
        return processor
    clip = CLIPImageProcessor(
        size=dict(image_processor.size), crop_size=dict(image_processor.crop_size),
        resample=image_processor.resample, do_resize=image_processor.do_resize,
        do_center_crop=image_processor.do_center_crop, do_rescale=image_processor.do_rescale,
        rescale_factor=image_processor.rescale_factor, do_normalize=image_processor.do_normalize,
        image_mean=image_processor.image_mean, image_std=image_processor.image_std,
        do_convert_rgb=image_processor.do_convert_rgb)
    return LlavaProcessor(
        image_processor=clip, tokenizer=processor.tokenizer, patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=getattr(processor, "chat_template", None), image_token=processor.image_token,
        num_additional_image_tokens=getattr(processor, "num_additional_image_tokens", 0))


MODEL_CLASSES = ("auto", "llava")


class JaVQAEvaluator(ScoresItems):
    """Japanese VQA ROUGE-L of a LLaVA / LLaVA-NeXT model (the EvoVLM-JP metric).

    Spec keys (all optional but the data source):

    - ``data``: a data spec (``path``/``hub``, ``config``, ``split``..., see :func:`load_examples`)
      or the same keys at top level; ``limit``, ``offset`` and the ``*_field`` names may sit at
      top level too.
    - ``metric``: ``robust`` (default) or ``sakana`` (see the module docstring); the score uses
      it, and items and metrics carry both readings (``rougeL_sakana``, ``rougeL_robust``).
    - ``model_class``: ``auto`` (default: the model as built, LLaVA-NeXT with anyres tiles) or
      ``llava`` (Sakana's ``LlavaForConditionalGeneration``: see :func:`llava_view` and
      :func:`single_image_processor`).
    - ``prompt``: ``"chat"`` (the processor's chat template; the default when it has one),
      ``"plain"`` (``USER: <image>\\n{question} ASSISTANT:``, the default otherwise),
      ``"ja-shisa-vqa"`` (Sakana's EvoVLM-JP prompt), or your own template with ``{question}``
      (and ``<image>``; without it the image goes just before the question).
    - ``system``: a system message for ``prompt: chat``.
    - ``num_beams`` (5), ``repetition_penalty`` (1.5), ``max_new_tokens`` (512),
      ``batch_size`` (4): the generation settings of Sakana's evaluation.
    - ``require_japanese`` (true): the score applies the Japanese rule; false scores any language.
    - ``language_model``: a fastText model file for the robust reading's language check
      (default: the kana/kanji character rule).

    Examples and the processor are loaded once, here; each call only generates and scores.
    Items carry ``prompt``, ``question``, ``output``, ``reference``, ``rougeL`` (and
    ``rougeL_<other metric>``), ``correct`` (``rougeL > 0``) and ``japanese``.
    """

    name = "ja_vqa"

    def __init__(self, spec: dict, tokenizer_source: str | Path | None = None, *,
                 processor: Any = None):
        self.spec = spec
        self.metric = check_metric(spec.get("metric", "robust"), "evaluator ja_vqa: metric")
        self.model_class = spec.get("model_class", "auto")
        if self.model_class not in MODEL_CLASSES:
            raise EvomergeError(f"evaluator ja_vqa: model_class {self.model_class!r} is unknown "
                                f"(use one of: {', '.join(MODEL_CLASSES)})")
        self.examples = load_examples(spec)
        self.num_beams = int(spec.get("num_beams", 5))
        self.repetition_penalty = float(spec.get("repetition_penalty", 1.5))
        self.max_new_tokens = int(spec.get("max_new_tokens", 512))
        self.batch_size = int(spec.get("batch_size", 4))
        if min(self.num_beams, self.max_new_tokens, self.batch_size) < 1:
            raise EvomergeError("evaluator ja_vqa: num_beams, max_new_tokens and batch_size must be >= 1")
        self.require_japanese = bool(spec.get("require_japanese", True))
        self.detector = JapaneseDetector(spec.get("language_model"))
        if processor is None:
            source = tokenizer_source or spec.get("processor") or spec.get("tokenizer")
            if source is None:
                raise EvomergeError("evaluator ja_vqa: no processor (give the VLM folder to take it from)")
            processor = load_processor(source)
        self.processor = prepare_processor(processor)
        if self.model_class == "llava":
            self.processor = single_image_processor(self.processor)
        self.prompts = [self._render(ex["question"]) for ex in self.examples]

    def _render(self, question: str) -> str:
        prompt = self.spec.get("prompt")
        has_chat = bool(getattr(self.processor, "chat_template", None))
        if prompt is None:
            prompt = "chat" if has_chat else "plain"
        if prompt == "chat":
            if not has_chat:
                raise EvomergeError("evaluator ja_vqa: prompt: chat but the processor has no chat "
                                    "template (use prompt: plain or a template with {question})")
            try:
                return chat_prompt(self.processor, question, self.spec.get("system"))
            except Exception as e:
                raise EvomergeError(f"evaluator ja_vqa: the processor's chat template failed "
                                    f"({describe(e)})") from None
        template = PROMPTS.get(prompt, prompt)
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        return format_prompt(question, str(template), image_token)

    def generation_config(self, model: Any) -> Any:
        """Beam search as Sakana's evaluation ran it (no sampling; beams, repetition penalty and
        length from the spec)."""
        from transformers import GenerationConfig

        tokenizer = self.processor.tokenizer
        return GenerationConfig(do_sample=False, num_beams=self.num_beams,
                                repetition_penalty=self.repetition_penalty,
                                max_new_tokens=self.max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=getattr(model.generation_config, "eos_token_id", None)
                                or tokenizer.eos_token_id)

    def generate(self, model: Any, prompts: list[str], images: list[Any]) -> list[str]:
        """Answers to ``prompts`` (rendered, one image each) with beam search, in input order.

        Batches group prompts of similar length; the processor expands each image placeholder
        into the model's image tokens and pads on the left.
        """
        import torch

        device = next(model.parameters()).device
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        config = self.generation_config(model)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        outputs = [""] * len(prompts)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.processor(text=[prompts[i] for i in idx], images=[images[i] for i in idx],
                                     padding=True, return_tensors="pt")
                enc = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                       for k, v in enc.items() if hasattr(v, "to")}
                with torch.inference_mode():
                    out = model.generate(**enc, generation_config=config)
                new = out[:, enc["input_ids"].shape[1]:]
                texts = self.processor.batch_decode(new, skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False)
                for i, text in zip(idx, texts, strict=True):
                    outputs[i] = text.strip()
        finally:
            model.train(was_training)
        return outputs

    @property
    def n_items(self) -> int:
        return len(self.examples)

    def score_items(self, runnable: Any, indices: Iterable[int]) -> Result:
        """Answer and score the examples at ``indices`` only (racing, estimated fitness). The
        per-item values are the items' ROUGE-L; their mean is the score up to the bootstrap
        aggregation of the ``sakana`` reading (its mid is the mean's bootstrap median)."""
        indices = list(indices)
        examples = [self.examples[i] for i in indices]
        model = llava_view(runnable) if self.model_class == "llava" else runnable
        outputs = self.generate(model, [self.prompts[i] for i in indices], [ex["image"] for ex in examples])
        items = []
        per_metric = {metric: [rouge_scores(out, ex["answer"], require_japanese=self.require_japanese,
                                            detector=self.detector, metric=metric)
                               for out, ex in zip(outputs, examples, strict=True)]
                      for metric in METRICS}
        for k, (i, example, output) in enumerate(zip(indices, examples, outputs, strict=True)):
            item = {"prompt": self.prompts[i], "question": example["question"], "output": output,
                    "reference": example["answer"]}
            for metric, scores in per_metric.items():
                suffix = "" if metric == self.metric else f"_{metric}"
                item[f"rougeL{suffix}"] = scores[k]["rougeL"].fmeasure * 100.0
            item["correct"] = item["rougeL"] > 0
            item["japanese"] = (ja_probability(output) >= 0.5 if self.metric == "sakana"
                                else self.detector(output))
            items.append(item)
        metrics = {f"rougeL_{m}": aggregate(scores, m) for m, scores in per_metric.items()}
        metrics["rougeL"] = metrics[f"rougeL_{self.metric}"]
        metrics["rougeL_any"] = score_pairs(items, require_japanese=False, metric=self.metric)["rougeL"]
        metrics["n"] = float(len(items))
        return Result(score=metrics["rougeL"], metrics=metrics, items=items,
                      values=[it["rougeL"] for it in items])
