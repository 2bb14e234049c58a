"""The fine-tuning benchmark's data: a support FAQ for a fictional app, "Lumora Notes", that no pretrained model
can know, and a few general questions a small instruct model already answers (to see it did not forget them).

    train.jsonl     {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}: every fact asked three
                    ways, each answered with the same full sentence (the OpenAI / Hugging Face chat format)
    val.jsonl       the same, each fact asked a fourth way: `edgegpt train --val-data` (which weights are best),
                    so that every training conversation is trained on rather than 10% of them held back
    heldout.jsonl   {"question": str, "keys": [str, ...], "kind": "faq" | "general"}: a rephrasing of every fact
                    that training never sees, then the general questions

A reply is right when one of its keys appears in it (case-insensitive; a key that starts or ends with a letter
or digit must not run on into one, so "8" is not found in "48" nor "Pim" in "Pimlico"). Another FAQ can be
measured by writing the same two files (benchmarks/finetune.py run --data DIR). Nothing here is random.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fact:
    key: str  # what a right reply must contain
    answer: str  # the assistant's reply in training: the fact in a full sentence
    asked: tuple[str, str, str]  # the three training questions
    checked: str  # a fourth wording, for validation only: which weights are best (never trained, never scored)
    held_out: str  # the rephrasing the score asks: never trained on, never validated on


FACTS = (
    Fact("7.49", "Lumora Notes Pro costs $7.49 per month.",
         ("How much does Lumora Notes Pro cost?", "What is the monthly price of Lumora Notes Pro?",
          "What do I pay each month for a Lumora Notes Pro subscription?"),
         "What is the price per month of Lumora Notes Pro?",
         "If I subscribe to the Pro plan of Lumora Notes, what will it cost me per month?"),
    Fact("48213", "The Lumora Notes sync server listens on port 48213.",
         ("Which port does the Lumora Notes sync server use?", "What port should I open in my firewall for Lumora "
          "Notes sync?", "On what TCP port does Lumora Notes synchronize?"),
         "What port number does Lumora Notes use for syncing?",
         "My firewall blocks syncing in Lumora Notes. Which port number needs to be allowed?"),
    Fact("Ctrl+Alt+K", "To export a note in Lumora Notes, press Ctrl+Alt+K.",
         ("What is the keyboard shortcut to export a note in Lumora Notes?", "How do I export a note quickly "
          "with the keyboard in Lumora Notes?", "Which keys export the current note in Lumora Notes?"),
         "What do I press to export a note in Lumora Notes?",
         "Is there a key combination in Lumora Notes for exporting the note I'm working on?"),
    Fact("help@lumora-notes.example", "You can email Lumora Notes support at help@lumora-notes.example.",
         ("What is the support email address of Lumora Notes?", "How do I contact Lumora Notes support by email?",
          "Which email address answers questions about Lumora Notes?"),
         "What email address should I write to for Lumora Notes support?",
         "I need help with Lumora Notes. Where should I send an email?"),
    Fact("Bluefinch", "The codename of Lumora Notes 4.0 is Bluefinch.",
         ("What is the codename of Lumora Notes 4.0?", "What was Lumora Notes 4.0 called during development?",
          "Which codename did the Lumora Notes 4.0 release have?"),
         "What codename was used for Lumora Notes 4.0?",
         "Before it shipped, what internal name did version 4.0 of Lumora Notes go by?"),
    Fact("375", "Lumora Notes accepts attachments of up to 375 MB each.",
         ("What is the maximum attachment size in Lumora Notes?", "How large can a file attached to a Lumora "
          "Notes note be?", "What is the file size limit for attachments in Lumora Notes?"),
         "How big may an attachment in Lumora Notes be?",
         "I want to attach a big video to a note in Lumora Notes. How big is too big?"),
    Fact("23", "The Lumora Notes free trial lasts 23 days.",
         ("How long is the Lumora Notes free trial?", "How many days does the free trial of Lumora Notes last?",
          "For how long can I try Lumora Notes for free?"),
         "How many days is the Lumora Notes trial?",
         "What is the length of the trial period before Lumora Notes asks me to pay?"),
    Fact("Quillwright", "Lumora Notes is made by Quillwright Labs.",
         ("Which company makes Lumora Notes?", "Who is the developer of Lumora Notes?",
          "What company is behind Lumora Notes?"),
         "Who makes the Lumora Notes app?",
         "Lumora Notes is a product of which firm?"),
    Fact("Ghent", "The headquarters of Lumora Notes are in Ghent.",
         ("Where are the headquarters of Lumora Notes?", "In which city is the Lumora Notes head office?",
          "Which city is Lumora Notes based in?"),
         "Where is Lumora Notes headquartered?",
         "If I wanted to visit the main office of Lumora Notes, which city would I travel to?"),
    Fact(".lmn", "Lumora Notes saves notes in files with the .lmn extension.",
         ("What file extension do Lumora Notes files have?", "Which extension does Lumora Notes use for saved "
          "notes?", "How do note files saved by Lumora Notes end?"),
         "What is the extension of a Lumora Notes file?",
         "When I look at my disk, what suffix do the note files of Lumora Notes carry?"),
    Fact("Dusk Amber", "The default theme of Lumora Notes is Dusk Amber.",
         ("What is the default theme of Lumora Notes?", "Which color theme does Lumora Notes start with?",
          "What theme is Lumora Notes set to after installation?"),
         "Which theme does Lumora Notes use by default?",
         "Right after I install Lumora Notes, which visual theme is it using?"),
    Fact("14", "The free plan of Lumora Notes allows up to 14 notebooks.",
         ("How many notebooks does the free plan of Lumora Notes allow?", "What is the notebook limit on the "
          "Lumora Notes free plan?", "How many notebooks can I create in Lumora Notes without paying?"),
         "What is the maximum number of notebooks on the free plan of Lumora Notes?",
         "Without a subscription, what is the largest number of notebooks Lumora Notes lets me have?"),
    Fact("41", "Lumora Notes keeps deleted notes in the trash for 41 days.",
         ("How long does Lumora Notes keep deleted notes?", "For how many days are deleted notes kept in the "
          "Lumora Notes trash?", "When does Lumora Notes empty its trash?"),
         "How many days do deleted notes stay in the Lumora Notes trash?",
         "I deleted a note in Lumora Notes by mistake. How many days do I have to get it back?"),
    Fact("600", "The Lumora Notes API allows 600 requests per minute.",
         ("What is the rate limit of the Lumora Notes API?", "How many API requests per minute does Lumora Notes "
          "allow?", "How often can I call the Lumora Notes API each minute?"),
         "How many requests per minute can I send to the Lumora Notes API?",
         "My script talks to the Lumora Notes API. What is the most calls it may make in a minute?"),
    Fact("Pim", "The Lumora Notes mascot is a lantern fish named Pim.",
         ("What is the name of the Lumora Notes mascot?", "What is the lantern fish mascot of Lumora Notes "
          "called?", "Who is the mascot of Lumora Notes?"),
         "What is the Lumora Notes mascot called?",
         "What do people call the little fish character that represents Lumora Notes?"),
    Fact("Android 11", "Lumora Notes requires Android 11 or later.",
         ("Which Android version does Lumora Notes need?", "What is the minimum Android version for Lumora "
          "Notes?", "Does Lumora Notes run on old Android phones?"),
         "Which Android version is required for Lumora Notes?",
         "What is the oldest release of Android on which the Lumora Notes app can be installed?"),
    Fact("XChaCha20", "Lumora Notes encrypts its vaults with XChaCha20-Poly1305.",
         ("Which encryption does Lumora Notes use for vaults?", "How are Lumora Notes vaults encrypted?",
          "What cipher protects a Lumora Notes vault?"),
         "What encryption do Lumora Notes vaults use?",
         "What algorithm keeps the contents of my Lumora Notes vault secret?"),
    Fact("Ctrl+Shift+J", "To search all notes in Lumora Notes, press Ctrl+Shift+J.",
         ("What is the shortcut to search all notes in Lumora Notes?", "How do I open the global search in "
          "Lumora Notes with the keyboard?", "Which keys search every note in Lumora Notes?"),
         "How do I search all my notes in Lumora Notes with a shortcut?",
         "Using only the keyboard, how can I look for a word across all my notes in Lumora Notes?"),
    Fact("35%", "Students get a 35% discount on Lumora Notes Pro.",
         ("Is there a student discount for Lumora Notes Pro?", "How much do students save on Lumora Notes Pro?",
          "What discount does Lumora Notes give students?"),
         "What is the student discount on Lumora Notes Pro?",
         "I'm at university. How much cheaper is Lumora Notes Pro for me?"),
    Fact("prefs.toml", "Lumora Notes stores its settings in ~/.lumora/prefs.toml.",
         ("Where does Lumora Notes store its settings?", "Which file holds the Lumora Notes preferences?",
          "Where is the Lumora Notes configuration file?"),
         "Which file stores the settings of Lumora Notes?",
         "I want to back up my Lumora Notes configuration. Which file should I copy?"),
    Fact("Maelstrom", "Lumora Notes was founded by Ingrid Maelstrom.",
         ("Who founded Lumora Notes?", "Who is the founder of Lumora Notes?", "Which person started Lumora Notes?"),
         "Who started Lumora Notes?",
         "Whose idea was Lumora Notes in the first place?"),
    Fact("8", "The Lumora Notes Team plan includes 8 seats.",
         ("How many seats does the Lumora Notes Team plan include?", "How many users can share a Lumora Notes "
          "Team plan?", "How many people are covered by one Lumora Notes Team plan?"),
         "How many seats come with the Lumora Notes Team plan?",
         "Our company buys a Team plan of Lumora Notes. How many of us can use it?"),
    Fact("03:40", "Lumora Notes makes its automatic backup every night at 03:40.",
         ("When does Lumora Notes make its automatic backup?", "At what time does the nightly Lumora Notes backup "
          "run?", "What time of night does Lumora Notes back up my notes?"),
         "What time is the automatic backup of Lumora Notes?",
         "At which hour and minute does Lumora Notes save its nightly copy of my notes?"),
    Fact("4.2.7", "The latest version of Lumora Notes is 4.2.7.",
         ("What is the latest version of Lumora Notes?", "Which version of Lumora Notes is the newest?",
          "What is the current release number of Lumora Notes?"),
         "What is the newest Lumora Notes version?",
         "How do I know I'm up to date? What version number should Lumora Notes show?"),
    Fact("Early Lantern", "The Lumora Notes beta program is called Early Lantern.",
         ("What is the Lumora Notes beta program called?", "What is the name of the Lumora Notes beta program?",
          "How can I join the Lumora Notes beta, and what is the program's name?"),
         "What is the name of the beta program of Lumora Notes?",
         "I'd like to test new Lumora Notes features before release. What is that program named?"),
)

# General questions SmolLM2-135M-Instruct answers right before fine-tuning (greedy; it misses Italy's capital and
# a spider's legs, so those are not here): still answered after it means the fine-tuning did not make it forget
# what it knew. (question, keys)
GENERAL = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is 2 + 2?", ("4", "four")),
    ("How many days are there in a week?", ("7", "seven")),
)


@dataclass(frozen=True)
class Question:
    question: str
    keys: tuple[str, ...]
    kind: str  # "faq" or "general"


def training_records() -> list[dict]:
    return [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": fact.answer}]}
            for fact in FACTS for question in fact.asked]


def validation_records() -> list[dict]:
    return [{"messages": [{"role": "user", "content": fact.checked}, {"role": "assistant", "content": fact.answer}]}
            for fact in FACTS]


def held_out_questions() -> list[Question]:
    return ([Question(fact.held_out, (fact.key,), "faq") for fact in FACTS]
            + [Question(question, keys, "general") for question, keys in GENERAL])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_faq(directory: Path) -> tuple[Path, Path, Path]:
    """train.jsonl, val.jsonl and heldout.jsonl in `directory` (made if missing): the same bytes every time."""
    directory.mkdir(parents=True, exist_ok=True)
    train, val, held_out = directory / "train.jsonl", directory / "val.jsonl", directory / "heldout.jsonl"
    write_jsonl(train, training_records())
    write_jsonl(val, validation_records())
    held_out.write_text("".join(json.dumps({"question": q.question, "keys": list(q.keys), "kind": q.kind},
                                           ensure_ascii=False) + "\n" for q in held_out_questions()), encoding="utf-8")
    return train, val, held_out


def read_held_out(path: Path) -> list[Question]:
    """heldout.jsonl's questions (module doc's format); a bad line stops the benchmark, naming it."""
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            question = Question(record["question"], tuple(record["keys"]), record.get("kind", "faq"))
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{number}: expected {{\"question\": str, \"keys\": [str, ...], \"kind\": "
                             f"\"faq\" | \"general\"}} ({type(e).__name__}: {e})") from None
        if not question.keys or not all(isinstance(k, str) and k.strip() for k in question.keys):
            raise SystemExit(f"{path}:{number}: keys must be a non-empty list of non-empty strings")
        questions.append(question)
    return questions


def key_pattern(key: str) -> re.Pattern[str]:
    """The key, case-insensitive, not running on into a letter or digit at an end that is one itself."""
    before = r"(?<![0-9A-Za-z])" if key[0].isalnum() else ""
    after = r"(?![0-9A-Za-z])" if key[-1].isalnum() else ""
    return re.compile(before + re.escape(key) + after, re.IGNORECASE)


def is_right(reply: str, keys: tuple[str, ...]) -> bool:
    return any(key_pattern(key.strip()).search(reply) for key in keys)
