"""Built-in demo data: synthetic essays in the Feedback Prize ELL layout.

`python train.py` with no arguments trains on this, so the project runs end to
end without downloads or data-licence questions.  A demo is only useful if the
model has something real to learn, so every essay is assembled from small
hand-written word lists and each of the six scores controls one observable
property of the text:

    grammar      agreement errors ("they has", "Marco go", "it are")
    conventions  misspellings and missing sentence-final periods (run-ons)
    vocabulary   advanced vs plain word choices ("crucial" vs "important")
    cohesion     sentence-initial connectives vs none, and repetition
    syntax       subordinate clauses vs short simple sentences
    phraseology  natural vs awkward collocations ("make" vs "do a decision")

The scores share a latent "proficiency" so they correlate like real rubric
scores, yet each has its own component, and about one score in ten carries
half a point of label noise.  No signal depends on letter case: the demo
model (all-MiniLM-L6-v2) is uncased and could not see it.

Everything is drawn from one `numpy.random.default_rng(seed)`, so the same
seed gives byte-identical CSV files.  Rows are generated one after another,
so the first k rows of a seed do not depend on how many rows were asked for.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from foldtune.config import DataConfig
from foldtune.files import atomic_write_csv

TARGETS = ("cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions")

TOPICS = (
    dict(topic=("playing sports", "joining a sports team"), people=("students", "players", "teenagers"),
         activity=("practice after school", "play on a team", "train with friends"),
         benefit=("stay healthy", "learn teamwork", "build confidence"), place=("at the gym", "on the field")),
    dict(topic=("using technology in class", "having phones at school"), people=("students", "kids", "young people"),
         activity=("use a laptop", "watch videos for class", "look things up online"),
         benefit=("find information fast", "learn new skills", "work at their own pace"),
         place=("in the classroom", "in the library")),
    dict(topic=("spending time with family", "eating dinner together"), people=("kids", "teenagers", "families"),
         activity=("cook a meal together", "visit their grandparents", "play board games at home"),
         benefit=("feel less stress", "talk about their day", "stay close"), place=("at home", "in the kitchen")),
    dict(topic=("having a summer job", "working part time"), people=("teenagers", "students", "young people"),
         activity=("work at a store", "babysit for neighbors", "deliver newspapers"),
         benefit=("save money", "learn responsibility", "meet new people"), place=("at work", "in town")),
    dict(topic=("doing community service", "volunteering"), people=("students", "volunteers", "teenagers"),
         activity=("clean up the park", "help at a shelter", "read to children"),
         benefit=("help their neighbors", "learn about the world", "feel useful"),
         place=("in the community", "at the shelter")),
    dict(topic=("taking online classes", "learning from home"), people=("students", "learners", "kids"),
         activity=("study at home", "join a video call", "finish lessons online"),
         benefit=("save travel time", "learn at their own speed", "sleep more"), place=("at home", "online")),
    dict(topic=("reading books", "going to the library"), people=("students", "readers", "kids"),
         activity=("read every night", "borrow a new book", "join a book club"),
         benefit=("learn new words", "use their imagination", "relax"), place=("in the library", "at home")),
    dict(topic=("learning to cook", "taking a cooking class"), people=("teenagers", "students", "young people"),
         activity=("cook for their friends", "try a new recipe", "bake bread"),
         benefit=("eat healthy food", "save money", "take care of themselves"), place=("in the kitchen", "at home")),
)
NAMES = ("Ana", "Marco", "Lena", "Omar", "Sofia", "Ken", "Priya", "Diego", "Mia", "Tariq")

# Plain word -> advanced alternative.  A template writes "{~plain}".
VOCAB = {"important": "crucial", "big": "significant", "good": "beneficial", "hard": "challenging",
         "very": "extremely", "a lot of": "numerous", "show": "demonstrate", "get": "acquire",
         "things": "aspects", "way": "approach", "problem": "obstacle", "chance": "opportunity",
         "happy": "fulfilled", "help": "guidance", "think about": "consider", "many": "various"}
# Natural collocation, awkward alternative.  A template writes "{@key}".
COLLOCATIONS = {"decision": ("make a decision", "do a decision"), "attention": ("pay attention", "give attention"),
                "break": ("take a break", "make a break"), "homework": ("do their homework", "make their homework"),
                "progress": ("make progress", "do progress"), "time": ("spend time", "pass time"),
                "mistakes": ("make mistakes", "do mistakes"), "difference": ("make a difference", "do a difference"),
                "rules": ("follow the rules", "obey to the rules"), "interested": ("interested in", "interested on"),
                "depends": ("depends on", "depends of"), "opinion": ("in my opinion", "on my opinion"),
                "effort": ("make an effort", "do an effort"), "risks": ("take risks", "make risks")}
# Correct spelling -> typical learner misspelling.
MISSPELL = {"because": "becuase", "their": "thier", "people": "poeple", "friends": "freinds", "believe": "beleive",
            "really": "realy", "which": "wich", "school": "scool", "with": "whith", "they": "thay", "when": "wen",
            "think": "thinck", "time": "tiem", "don't": "dont", "doesn't": "doesnt", "together": "togeter",
            "parents": "parens", "there": "ther", "would": "woud", "other": "othre"}
CONNECTIVES = ("however", "for example", "as a result", "in addition", "furthermore", "on the other hand",
               "therefore", "for instance", "moreover", "in fact")

# Templates: "{a|b}" is a grammar slot (correct form first), "{~w}" vocabulary, "{@k}" collocation,
# "{topic}" etc. come from the essay's topic.
THESIS = ("{topic} {is|are} {~important} for {people} who want to {@progress}",
          "{topic} {is|are} a {~good} {~way} to {benefit} and {@time} well",
          "{people} should {~think about} {topic} because it {helps|help} them {@decision}")
MAIN = ("{people} {learn|learns} {~many} {~things} and {@progress} when they {activity}",
        "{people} who {activity} {are|is} {~very} likely to {@effort}",
        "{name} {doesn't|don't} think that {topic} {is|are} a {~big} waste of time",
        "it {is|are} {~hard} to {@decision} about {topic}",
        "{people} {@attention} in class and {~get} {~good} grades when they {activity}",
        "{topic} {helps|help} {people} {benefit} and {@difference}",
        "my parents {say|says} that {topic} {gives|give} us a {~chance} to {@progress}",
        "{name} {goes|go} {place} {~very} often to {activity} and {@break}",
        "{people} {@progress} in a {~big} way if they {activity} every week",
        "{people} should {@break} from their phones and {activity}",
        "{people} {@time} with their friends, which {is|are} {~important} to them",
        "everyone {has|have} a {~big} {~problem} sometimes, and {people} {@mistakes} too",
        "{people} {@difference} and {~show} {~many} skills when they {activity}",
        "{people} {have|has} to {@rules} {place}, and it {is|are} {~hard}",
        "{~many} {people} {are|is} {@interested} {topic}",
        "the choice {@depends} the person, so {people} must {@decision}",
        "{people} still {need|needs} to {@homework} after they {activity}",
        "a {~big} {~problem} is that {people} {don't|doesn't} {@time} on {topic}",
        "{name} {was|were} {~happy} after {topic} and {wants|want} to {@effort} again",
        "i {believe|believes} {people} should {@effort} to {activity}",
        "there {are|is} {~a lot of} reasons to {@time} on {topic}",
        "{people} {need|needs} {~help} from their parents to {@decision}",
        "{people} who {@risks} {~get} {~many} new skills {place}",
        "this {shows|show} that {people} {are|is} ready to {@effort} and {activity}")
SUB = ("because they {want|wants} to {@progress}", "although some adults {think|thinks} it {is|are} a waste of time",
       "when they {have|has} time to {@break}", "which {makes|make} them feel {~happy}",
       "if their parents {let|lets} them {@decision}", "since it {is|are} a {~good} {~way} to {benefit}",
       "while they {are|is} still {@interested} it", "so that they can {~show} what they {know|knows}",
       "even though it {takes|take} {~a lot of} time", "unless they {are|is} too busy to {@break}")
FRONT = ("when they {have|has} {~a lot of} free time", "although it {takes|take} {~a lot of} work",
         "if their parents {agree|agrees} with the {~way}", "because {topic} {is|are} {~important}",
         "even though some people {disagree|disagrees} with the {~problem}")
SHORT = ("it {is|are} {~good}", "i {like|likes} it", "that {is|are} {~important}", "they {like|likes} it a lot",
         "{name} {agrees|agree}", "it {helps|help} them {@progress}")
SLOT = re.compile(r"\{([~@]?)([^{}]+)\}")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


class _Dial:
    """Fires at a steady rate: over k calls it fires k * rate times, give or take one.

    Independent coin flips per slot would bury a half-point score difference in
    binomial noise; a dial keeps the number of weak choices in an essay
    proportional to its score, so the deliberate label noise is the main imperfection.
    """

    def __init__(self, rate: float, rng: np.random.Generator):
        self.rate, self.phase = rate, rng.random()

    def __call__(self) -> bool:
        self.phase += self.rate
        if self.phase < 1.0:
            return False
        self.phase -= 1.0
        return True


def _dials(levels: dict, rng: np.random.Generator) -> dict:
    """One dial per text property, set by the score it stands for (weakness 0 = 5.0, 1 = 1.0)."""
    w = {t: (5.0 - levels[t]) / 4.0 for t in TARGETS}
    rates = {"error": 0.9 * w["grammar"], "plain": w["vocabulary"], "awkward": w["phraseology"],
             "connective": 0.9 * (1 - w["cohesion"]), "repeat": 0.3 * w["cohesion"],
             "short": 0.5 * w["syntax"], "clause": 1 - w["syntax"], "front": 0.4 * (1 - w["syntax"]),
             "typo": 0.7 * w["conventions"], "run_on": 0.5 * w["conventions"], "no_comma": w["conventions"]}
    return {name: _Dial(rate, rng) for name, rate in rates.items()}


def _fill(template: str, topic: dict, dial: dict, rng: np.random.Generator) -> str:
    """Resolve every slot; the dials decide where the weaker variant goes."""
    def resolve(m: re.Match) -> str:
        kind, body = m.groups()
        if kind == "~":
            return body if dial["plain"]() else VOCAB[body]
        if kind == "@":
            return COLLOCATIONS[body][dial["awkward"]()]
        if "|" in body:
            return body.split("|")[dial["error"]()]
        return _pick(rng, NAMES) if body == "name" else _pick(rng, topic[body])
    return SLOT.sub(resolve, template)


def _sentence(topic: dict, dial: dict, rng: np.random.Generator) -> str:
    """One body sentence: complexity follows syntax, the opening connective follows cohesion."""
    fill = lambda t: _fill(t, topic, dial, rng)  # noqa: E731
    if dial["short"]():
        return fill(_pick(rng, SHORT))  # strings of very short sentences mark low syntax scores
    s = fill(_pick(rng, MAIN))
    if dial["clause"]():
        s += " " + fill(_pick(rng, SUB))
    if dial["front"]():
        s = fill(_pick(rng, FRONT)) + ", " + s
    if dial["connective"]():
        s = _pick(rng, CONNECTIVES) + ("" if dial["no_comma"]() else ",") + " " + s
    return s


def _misspell(sentence: str, dial: dict) -> str:
    words = sentence.split(" ")
    for i, word in enumerate(words):
        core = word.rstrip(",")
        if core in MISSPELL and dial["typo"]():
            words[i] = MISSPELL[core] + word[len(core):]
    return " ".join(words)


def _render(paragraphs: list, dial: dict) -> str:
    """Apply conventions (spelling, capitals, final periods) and join the paragraphs."""
    out = []
    for sentences in paragraphs:
        text, run_on = "", False
        for s in sentences:
            s = _misspell(s, dial)
            s = re.sub(r"(^| )i ", r"\1I ", s)
            if not run_on:  # a run-on goes on without a capital, as in real essays
                s = s[0].upper() + s[1:]
            run_on = dial["run_on"]()
            text += (" " if text else "") + s + ("" if run_on else ".")
        out.append(text)
    return "\n\n".join(out)


def _essay(levels: dict, rng: np.random.Generator) -> str:
    dial = _dials(levels, rng)
    topic = _pick(rng, TOPICS)
    thesis = _fill(_pick(rng, THESIS), topic, dial, rng)
    intro = [_fill("{@opinion}, ", topic, dial, rng) + thesis]
    # Length is drawn independently of the scores, so no target can be read off word count.
    body, budget, n_words = [], int(rng.integers(20, 80)), len(thesis.split())
    while n_words < budget:
        body.append(_sentence(topic, dial, rng))
        if dial["repeat"]():
            body.append(thesis)  # weak writers circle back to the same sentence verbatim
        n_words = sum(len(s.split()) for s in body)
    closing = "in conclusion, " if dial["connective"]() else ""
    ending = [closing + _fill(_pick(rng, THESIS), topic, dial, rng)]
    cut = int(rng.integers(1, len(body))) if len(body) > 3 else len(body)
    paragraphs = [p for p in (intro, body[:cut], body[cut:], ending) if p]
    return _render(paragraphs, dial)


def _scores(rng: np.random.Generator) -> tuple[dict, dict]:
    """True levels (which shape the text) and noisy labels, on the 1-5 half-point grid."""
    proficiency = rng.normal()
    own = rng.normal(size=len(TARGETS))
    # Loadings 0.77/0.64 give a latent correlation of 0.6 between targets (~0.5 after rounding).
    raw = 3.0 + 0.65 * (0.77 * proficiency + 0.64 * own)
    true = np.clip(np.round(raw * 2) / 2, 1.0, 5.0)
    # Label noise: a minority of scores is off by half a point, as between human raters.
    noise = np.where(rng.random(len(TARGETS)) < 0.1, rng.choice((-0.5, 0.5), size=len(TARGETS)), 0.0)
    label = np.clip(true + noise, 1.0, 5.0)
    return dict(zip(TARGETS, true.tolist())), dict(zip(TARGETS, label.tolist()))


def _text_ids(seed: int, n: int) -> list[str]:
    """12 upper-case hex digits from sha1(seed, index); collisions (never seen) are skipped."""
    ids, seen, i = [], set(), 0
    while len(ids) < n:
        tid = hashlib.sha1(f"foldtune-demo:{seed}:{i}".encode()).hexdigest()[:12].upper()
        i += 1
        if tid not in seen:
            seen.add(tid)
            ids.append(tid)
    return ids


def make_demo(n_train: int = 600, n_test: int = 150, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (train, test) frames in the Kaggle layout; test has no target columns."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"row counts must be >= 0, got n_train={n_train}, n_test={n_test}")
    rng = np.random.default_rng(seed)
    rows = []
    for text_id in _text_ids(seed, n_train + n_test):
        true, label = _scores(rng)
        rows.append({"text_id": text_id, "full_text": _essay(true, rng), **label})
    frame = pd.DataFrame(rows, columns=["text_id", "full_text", *TARGETS])
    frame[list(TARGETS)] = frame[list(TARGETS)].astype("float64")
    train = frame.iloc[:n_train].reset_index(drop=True)
    test = frame.iloc[n_train:, :2].reset_index(drop=True)
    return train, test


def write_demo(directory, n_train: int = 600, n_test: int = 150, seed: int = 0) -> tuple[Path, Path]:
    """Write directory/train.csv and directory/test.csv; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, test = make_demo(n_train, n_test, seed)
    paths = directory / "train.csv", directory / "test.csv"
    atomic_write_csv(paths[0], train)
    atomic_write_csv(paths[1], test)
    return paths


# The demo's own files: DataConfig's default paths (configs/default.yaml names the same).
DEMO_TRAIN_FILE, DEMO_TEST_FILE = DataConfig.train_file, DataConfig.test_file


def is_demo_file(path: str | Path, own: str) -> bool:
    return Path(path).resolve() == Path(own).resolve()


def demo_files(data: DataConfig) -> dict[str, Path]:
    """The data files the demo provides, by key: with data.demo on and the demo's own
    train_file, each of train_file and test_file that is at the demo's own path. A path
    the user chose is never the demo's, and a user's train_file never gets a demo test file."""
    if not data.demo or not is_demo_file(data.train_file, DEMO_TRAIN_FILE):
        return {}
    files = {"data.train_file": Path(data.train_file)}
    if data.test_file is not None and is_demo_file(data.test_file, DEMO_TEST_FILE):
        files["data.test_file"] = Path(data.test_file)
    return files


def write_demo_files(data: DataConfig) -> list[Path]:
    """Write those of the demo's files (demo_files) that are absent; return them. A file
    that exists is never written over, whatever it holds."""
    absent = {key: path for key, path in demo_files(data).items() if not path.exists()}
    if not absent:
        return []
    train, test = make_demo()
    frames = {"data.train_file": train, "data.test_file": test}
    for key, path in absent.items():
        atomic_write_csv(path, frames[key])
    return list(absent.values())
