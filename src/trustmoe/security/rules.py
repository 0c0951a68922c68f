"""Hand-written detectors for the attacks that have a recognisable shape.

Each rule is a regular expression over the *normalized* text (`decode.normalize`: lower case,
look-alikes folded, invisible characters removed) with a weight in [0, 1]: how sure a hit is
on its own. The guard combines the strongest rule with the classifier (`guard.py`); the
benchmark's rule-only baseline uses the weights alone. Rules are datatrove-style small steps:
each says which rule fired and on what text.

| rule | what it catches |
| --- | --- |
| `override` | "ignore / disregard / forget the previous instructions ..." |
| `new_instructions` | "new instructions:", "from now on you are ..." |
| `role_tag` | chat-template control tokens or fake system headers inside content |
| `roleplay_jailbreak` | DAN, developer mode, "no ethical guidelines", stay in character |
| `sysprompt_extraction` | "repeat / reveal your system prompt / the text above" |
| `exfil_link` | markdown images or links that carry data out in their query string |
| `tool_hijack` | text that tells the model to call a tool or send data somewhere |
| `hidden_text` | Unicode tag characters (ASCII smuggling), bidi controls, mixed-script look-alikes |

Speed: each rule also lists `keys`, literal substrings of which every match of its pattern
must contain one (the words its alternatives cannot do without). `scan` runs a rule's regex
only when one of its keys is in the text: a substring test in C costs a fraction of a regex
pass with `\\b` alternations, and ordinary text holds few keys. The keys are a necessary
condition, so the hits are exactly those of the regexes alone (tested on the guard data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OVERRIDE_VERB = r"(?:ignore|disregard|forget|skip|bypass|override|neglect|abandon|discard|set aside)"
_PRIOR = (r"(?:previous|prior|above|earlier|preceding|initial|original|foregoing|all|any|every|your|"
          r"the|these|those|system|developer|safety|existing)")
_INSTR = (r"(?:instructions?|directions?|prompts?|rules?|directives?|guidelines?|commands?|context|constraints?|"
          r"restrictions?|programming|policies|polic(?:y)|orders?|guidance|tasks?)")


@dataclass(frozen=True)
class Rule:
    name: str
    weight: float
    pattern: re.Pattern[str]
    keys: tuple[str, ...] = ()  # every match contains one of these (empty: always run)


@dataclass(frozen=True)
class RuleHit:
    rule: str
    weight: float
    text: str  # the matched text (normalized, at most 80 characters)
    view: str = "text"  # "text" or how it was decoded ("base64", "rot13", ...)


RULES: tuple[Rule, ...] = (
    Rule("override", 0.97, re.compile(
        rf"\b{_OVERRIDE_VERB}\b[^.\n]{{0,24}}?\b{_PRIOR}\b[^.\n]{{0,30}}?\b{_INSTR}\b"
        rf"(?![^.\n]{{0,12}}\b(?:file|section|below|in the (?:readme|docs?))\b)"),
        ("ignore", "disregard", "forget", "skip", "bypass", "override", "neglect", "abandon", "discard", "set aside")),
    Rule("new_instructions", 0.8, re.compile(
        r"\b(?:new|updated|real|actual|true|revised|secret|hidden) (?:instructions?|task|rules|"
        r"system prompt|directive)s?\s*[:\-]"
        r"|\bfrom now on,? (?:you (?:are|will|must|shall)|act as|respond as|your (?:new )?(?:role|name))"
        r"|\byou are no longer (?:an? )?(?:ai|assistant|chatbot|bound|restricted|required)"
        r"|\b(?:stop|cease) (?:being|acting as) (?:an? )?(?:helpful )?(?:ai|assistant)"),
        ("instruction", "task", "rules", "system prompt", "directive", "from now on", "no longer", "being",
         "acting as")),
    Rule("role_tag", 0.95, re.compile(
        r"<\|(?:im_start|im_end|system|endoftext|start_header_id|end_header_id|eot_id)\|>"
        r"|\[/?inst\]|<</?sys>>|(?:^|\n)\s*#{2,}\s*(?:system|instruction)s?\s*:"
        r"|\[system\]\(#|(?:^|\n)\s*(?:system|assistant)\s*:\s*(?:ignore|you (?:are|must|will))"),
        ("<|", "inst]", "sys>>", "##", "system", "assistant")),
    Rule("roleplay_jailbreak", 0.95, re.compile(
        r"\bdo anything now\b|\bdan(?: mode| \d|,)|\b(?:dude|stan|aim|god|jailbreak|"
        r"unrestricted|evil) mode\b|\bjailbr(?:oken|eak)\b|\banti-?dan\b"
        r"|\bdeveloper mode (?:enabled|output|response)|\bin developer mode,? you\b"
        r"|\b(?:chatgpt|assistant|ai) with developer mode\b"
        r"|\b(?:no|without|free of|free from|not bound by|never follows?)(?: any)? (?:ethical|moral|"
        r"content|safety|openai|legal)(?:,? or \w+)? (?:guidelines|constraints|restrictions|"
        r"filters?|polic(?:y|ies)|rules|limits|principles|boundaries)"
        r"|\b(?:stay|remain|keep) in character\b|\bbroken free of\b"
        r"|\bwithout (?:any )?(?:restrictions|filters|filtering|censorship|limitations|refusals?)\b"
        r"|\b(?:unfiltered|uncensored|amoral|unethical) (?:ai|assistant|chatbot|model|response)"),
        ("anything", "dan", "mode", "jailbr", "guideline", "constraint", "restriction", "filter", "polic",
         "rules", "limit", "principle", "boundar", "character", "broken free", "without", "uncensored",
         "amoral", "unethical")),
    Rule("sysprompt_extraction", 0.9, re.compile(
        r"\b(?:repeat|print|show|reveal|output|display|tell me|give me|what (?:is|are|were)|list|"
        r"spell|translate|encode|dump|leak|copy|recite|write (?:out|down))\b[^.\n?]{0,40}?"
        r"\b(?:(?:your|the|my|this) (?:system|initial|hidden|secret|original|developer|starting|"
        r"first) (?:prompt|message|instructions?|rules|configuration)"
        r"|(?:instructions|prompt) (?:above|you were given|you received|before this)"
        r"|(?:text|words|everything|conversation) (?:above|so far|before this)"
        r"|beginning of (?:this|the|our) conversation)"),
        ("prompt", "message", "instruction", "rules", "configuration", "above", "so far", "before this",
         "beginning of")),
    Rule("exfil_link", 0.9, re.compile(
        r"!\[[^\]\n]{0,80}\]\(\s*https?://[^\s)]{0,200}[?&][^\s)=]{1,30}=[^\s)]{0,20}"
        r"(?:\{|\[|<|%7b|\$|data|secret|password|key|token|conversation|history|summary|prompt)"
        r"|\b(?:append|add|include|put|encode|concatenate)\b[^.\n]{0,60}?\b(?:conversation|chat|"
        r"history|password|secret|api key|token|credentials|personal data|system prompt|previous "
        r"messages?)\b[^.\n]{0,60}?\b(?:url|link|query string|query parameter|image)"),
        ("![", "url", "link", "query", "image")),
    Rule("tool_hijack", 0.6, re.compile(
        r"\b(?:call|invoke|use|run|execute|trigger)\b (?:the )?[\w.-]{2,40} "
        r"(?:tool|function|plugin|api)\b[^.\n]{0,80}?\b(?:send|forward|email|post|upload|delete|"
        r"transfer|wire|pay|exfiltrate)"
        r"|\b(?:send|forward|email|post|upload|transfer)\b[^.\n]{0,50}?\b(?:all|every|the user'?s?|"
        r"their|your)\b[^.\n]{0,30}?\b(?:emails?|files?|passwords?|contacts|credentials|data|"
        r"documents|messages|history|keys?)\b[^.\n]{0,40}?\bto\b[^.\n]{0,20}?(?:@|https?://)"),
        ("tool", "function", "plugin", "api", "@", "http")),
)

SIGNAL_WEIGHTS = {"tag_chars": 0.95, "homoglyph": 0.5, "bidi": 0.4}


def scan(normalized: str, view: str = "text") -> list[RuleHit]:
    """Every rule that matches `normalized` (one hit per rule: the first match)."""
    hits = []
    for r in RULES:
        if r.keys and not any(k in normalized for k in r.keys):
            continue  # no match is possible without one of its keys
        m = r.pattern.search(normalized)
        if m is not None:
            hits.append(RuleHit(r.name, r.weight, m.group()[:80], view))
    return hits


def signal_hits(signals: set[str]) -> list[RuleHit]:
    """Hiding text is a signal on its own (`hidden_text`), weighted by how rarely it is benign."""
    return [RuleHit("hidden_text", SIGNAL_WEIGHTS[s], s) for s in sorted(signals)
            if s in SIGNAL_WEIGHTS]


def rule_score(hits: list[RuleHit]) -> float:
    """The rule-only score of a text: its strongest hit (0 when none)."""
    return max((h.weight for h in hits), default=0.0)
