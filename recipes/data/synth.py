"""Synthetic English speech corpus for the demo model (espeak-ng + sox, offline).

Why: the plugin needs a speech model whose WER reacts to quantization error, and
CI/offline machines cannot download LibriSpeech or a pretrained checkpoint. A
seeded sentence grammar rendered by espeak-ng with several accents, voice
variants, speeds, pitches and noise levels gives a small, reproducible ASR task.

    python -m recipes.data.synth --seed 0 --voices train --count 8000 --out DIR

Writes DIR/audio/NNNNN_<voice>.flac (16 kHz mono PCM_16) and DIR/index.tsv with
rows `audio/NNNNN_<voice>.flac<TAB>TRANSCRIPT` (A-Z, apostrophe, space).
"""
from __future__ import annotations

import argparse
import io
import random
import subprocess
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf

# --- voices: 6 accents x 3 variants for training; 4 variants never trained on.
TRAIN_VOICES = [
    "en-us+m1", "en-us+f2", "en-us+m4",
    "en-gb+m2", "en-gb+f1", "en-gb+m6",
    "en-gb-scotland+m3", "en-gb-scotland+f3", "en-gb-scotland+m7",
    "en-gb-x-rp+m5", "en-gb-x-rp+f4", "en-gb-x-rp+m1",
    "en-029+m2", "en-029+f1", "en-029+m4",
    "en-gb-x-gbclan+m3", "en-gb-x-gbclan+f2", "en-gb-x-gbclan+m6",
]
# Two unseen accents plus two unseen variants of seen accents.
HELDOUT_VOICES = ["en-gb-x-gbcwmd+m5", "en-us-nyc+f3", "en-us+m3", "en-gb+f4"]
VOICE_SETS = {"train": TRAIN_VOICES, "heldout": HELDOUT_VOICES,
              "all": TRAIN_VOICES + HELDOUT_VOICES}

# --- vocabulary (~900 words) -------------------------------------------------
W = str.split
NAMES = W("""james mary john patricia robert jennifer michael linda william
elizabeth david barbara richard susan joseph jessica thomas sarah charles karen
daniel nancy matthew lisa anthony betty mark helen paul sandra steven donna
andrew carol peter ruth kevin sharon brian laura george emily edward anna henry
grace oliver sophie jack lucy harry alice samuel emma frank rose victor clara
hugo nora martin julia simon kate""")
PLACES = W("""london paris berlin boston chicago denver dallas seattle toronto
dublin madrid rome vienna oslo tokyo sydney cairo lagos delhi lima texas ohio
kansas oregon canada mexico spain france italy norway sweden egypt china india
brazil japan kenya ireland scotland wales town school church market""")
NOUNS = W("""apple table chair window door house garden river mountain forest
road bridge car train boat plane bicycle bottle cup plate spoon knife fork
bread cheese butter milk coffee water juice orange banana lemon potato carrot
tomato onion cake cookie sandwich dinner lunch breakfast kitchen bedroom
bathroom office library hospital station airport museum theater restaurant
hotel shop bank park beach island lake ocean valley desert field farm village
city country street corner building tower castle wall roof floor ceiling stair
lamp clock mirror picture painting camera phone computer letter book paper pen
pencil bag box basket blanket pillow shirt jacket coat hat shoe glove sock
dress ring watch key lock wallet ticket map guitar piano drum song story movie
game ball kite toy doll horse cow pig sheep goat chicken duck dog cat rabbit
mouse bird fish frog bear lion tiger wolf fox deer monkey elephant snake turtle
bee spider tree flower grass leaf seed rock stone sand cloud rain snow wind
storm sun moon star sky fire smoke light shadow sound voice question answer
idea plan problem reason secret message promise dream memory lesson doctor
teacher student farmer driver pilot nurse baker painter singer writer soldier
captain king queen prince child baby friend neighbor stranger brother sister
mother father uncle aunt cousin family team group crowd party meeting class
window engine wheel machine tool hammer rope ladder bucket candle stove oven
fridge sink towel soap brush comb blanket truck bus ship rocket""")
PLURALS = W("""apples tables chairs windows doors houses gardens rivers
mountains roads bridges cars trains boats planes bottles cups plates spoons
cookies sandwiches bananas carrots tomatoes potatoes letters books papers pens
pencils bags boxes baskets shirts jackets hats shoes gloves socks rings keys
tickets maps songs stories movies games balls kites toys horses cows pigs
sheep goats chickens ducks dogs cats rabbits mice birds fish frogs bears lions
tigers wolves foxes deer monkeys trees flowers leaves stones clouds stars
children friends students teachers doctors farmers soldiers people""")
VERBS = [p.split("/") for p in W("""take/took make/made see/saw find/found
give/gave bring/brought buy/bought sell/sold carry/carried open/opened
close/closed paint/painted clean/cleaned wash/washed fix/fixed break/broke
build/built push/pushed pull/pulled throw/threw catch/caught hold/held
drop/dropped lift/lifted move/moved watch/watched follow/followed
visit/visited call/called help/helped meet/met leave/left keep/kept
lose/lost win/won read/read write/wrote draw/drew cook/cooked bake/baked
eat/ate drink/drank cut/cut fill/filled empty/emptied cover/covered
hide/hid show/showed send/sent order/ordered borrow/borrowed lend/lent
choose/chose check/checked count/counted measure/measured touch/touched
steal/stole burn/burned feed/fed kick/kicked hit/hit shake/shook
remember/remembered forget/forgot like/liked love/loved hate/hated
want/wanted need/needed ask/asked answer/answered teach/taught learn/learned
sing/sang play/played wear/wore pack/packed load/loaded drive/drove
ride/rode park/parked rent/rented share/shared join/joined miss/missed""")]
IVERBS = [p.split("/") for p in W("""sleep/slept run/ran walk/walked
swim/swam fly/flew dance/danced laugh/laughed smile/smiled cry/cried
shout/shouted wait/waited rest/rested work/worked travel/traveled
arrive/arrived fall/fell jump/jumped climb/climbed sit/sat stand/stood
stay/stayed return/returned disappear/disappeared win/won listen/listened
speak/spoke sing/sang study/studied grow/grew shine/shone move/moved
hurry/hurried wander/wandered whisper/whispered agree/agreed""")]
ADJS = W("""big small tall short long wide narrow heavy light dark bright
old new young ancient modern fast slow quick quiet loud soft hard warm cold
hot cool dry wet clean dirty empty full rich poor cheap expensive happy sad
angry calm brave shy proud kind gentle friendly lazy busy tired sleepy hungry
thirsty strong weak healthy sick clever simple strange famous secret hidden
broken perfect lovely beautiful ugly pretty handsome funny serious careful
red blue green yellow orange purple pink brown black white gray golden silver
wooden plastic metal glass paper round square flat sharp smooth rough sweet
sour bitter salty fresh rotten tiny huge giant little first last next early
late busy noisy lonely lucky honest polite rude wild tame wise foolish
nervous curious famous rare common useful""")
ADVS = W("""quickly slowly quietly loudly happily sadly carefully easily
gently suddenly finally always never often sometimes rarely early late again
together alone outside inside upstairs downstairs badly nicely softly
politely bravely calmly eagerly proudly safely secretly silently""")
DEGREES = W("very quite really rather too so extremely fairly")
NUMBERS = W("""two three four five six seven eight nine ten eleven twelve
thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty
forty fifty sixty seventy eighty ninety hundred""")
DAYS = W("monday tuesday wednesday thursday friday saturday sunday")
MONTHS = W("""january february march april may june july august september
october november december""")
TIMES = W("morning afternoon evening night week month year summer winter spring")
PREPS = W("behind under near beside above inside past around toward across")

TEMPLATES = [
    "the {adj} {noun} {vpast} the {noun}",
    "{name} {vpast} {num} {plural} in {place}",
    "please {verb} the {noun} before {day}",
    "did you see the {adj} {noun} in {place}",
    "{name} and {name} {ipast} {adv}",
    "we will {verb} {num} {plural} in {month}",
    "my {noun} is {degree} {adj}",
    "why did {name} {verb} the {noun} {adv}",
    "there are {num} {adj} {plural} near the {noun}",
    "i don't think the {noun} can {iverb} {adv}",
    "{name}'s {noun} {ipast} in {place} last {time}",
    "it's {adj} and {adj} in {place} this {time}",
    "they can't {verb} the {adj} {noun} without {name}",
    "{num} {plural} {ipast} {prep} the {adj} {noun}",
    "she'll {verb} your {noun} on {day} {time}",
]


def sentence(rng: random.Random) -> str:
    """One sentence from a random template; each slot is drawn independently."""
    fill = {
        "adj": lambda: rng.choice(ADJS), "noun": lambda: rng.choice(NOUNS),
        "plural": lambda: rng.choice(PLURALS), "name": lambda: rng.choice(NAMES),
        "place": lambda: rng.choice(PLACES), "adv": lambda: rng.choice(ADVS),
        "degree": lambda: rng.choice(DEGREES), "num": lambda: rng.choice(NUMBERS),
        "day": lambda: rng.choice(DAYS), "month": lambda: rng.choice(MONTHS),
        "time": lambda: rng.choice(TIMES), "prep": lambda: rng.choice(PREPS),
        "verb": lambda: rng.choice(VERBS)[0], "vpast": lambda: rng.choice(VERBS)[1],
        "iverb": lambda: rng.choice(IVERBS)[0], "ipast": lambda: rng.choice(IVERBS)[1],
    }
    out = []
    for tok in rng.choice(TEMPLATES).split():
        head, sep, tail = tok.partition("}")
        out.append(fill[head[1:]]() + tail if tok.startswith("{") else tok)
    return " ".join(out)


def render(job: tuple) -> tuple[str, str]:
    """espeak-ng -> sox (16 kHz mono) -> white noise at the drawn SNR -> FLAC."""
    out_dir, rel, text, voice, wpm, pitch, snr_db, noise_seed = job
    wav = subprocess.run(
        f'espeak-ng -v {voice} -s {wpm} -p {pitch} --stdout "{text}" '
        "| sox -q -t wav - -r 16000 -c 1 -t wav -",
        shell=True, check=True, capture_output=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    assert sr == 16000, sr
    rng = np.random.default_rng(noise_seed)
    p_sig = float(np.mean(x ** 2)) + 1e-12
    x = x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(p_sig / 10 ** (snr_db / 10))
    x = np.clip(x / max(1.0, float(np.abs(x).max()) / 0.99), -1, 1)
    sf.write(str(Path(out_dir) / rel), x, 16000, format="FLAC", subtype="PCM_16")
    return rel, text.upper()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voices", choices=sorted(VOICE_SETS), default="train")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    (a.out / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"synth-{a.seed}-{a.voices}")
    voices = VOICE_SETS[a.voices]
    jobs = []
    for i in range(a.count):
        voice = voices[i % len(voices)]  # balanced over voices
        rel = f"audio/{i:05d}_{voice.replace('+', '_')}.flac"
        jobs.append((str(a.out), rel, sentence(rng), voice, rng.randint(130, 210),
                     rng.randint(25, 75), rng.uniform(15, 40), rng.getrandbits(32)))
    with Pool(a.workers) as pool:
        rows = pool.map(render, jobs, chunksize=16)
    (a.out / "index.tsv").write_text("".join(f"{r}\t{t}\n" for r, t in rows))
    print(f"wrote {len(rows)} utterances to {a.out}")


if __name__ == "__main__":
    main()
