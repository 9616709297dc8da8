"""The device side must prompt and preprocess without torch or transformers installed."""

import json
import subprocess
import sys


def test_prompting_and_preprocessing_import_no_torch(checkpoint):
    code = f"""
import json, sys
import edgelmm
from edgelmm.families import detect
from edgelmm.modelfiles import ModelFiles
from edgelmm.prompt import parse_prompt, render_chat
from edgelmm.images import sample_images
for d in {[str(checkpoint(k)) for k in ("llava-siglip", "idefics2", "idefics3")]!r}:
    files = ModelFiles.open(d)
    fam = detect(files)
    vision = fam.preprocess(sample_images(2))
    text = render_chat(files.chat_template, parse_prompt("<image> vs <image>").messages, files.special_tokens_map)
    ids = files.tokenizer.encode(fam.expand_prompt(text, vision)).ids
    assert ids.count(fam.image_token_id) == sum(r.count(fam.image_token) for r in vision.replacements)
    edgelmm.info(d)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
