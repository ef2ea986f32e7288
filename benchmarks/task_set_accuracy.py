"""The shipped multiple-choice task set: how it was built, and how well the embedded model answers
it.

    .venv/bin/python benchmarks/task_set_accuracy.py            # accuracy of the shipped set
    .venv/bin/python benchmarks/task_set_accuracy.py --rebuild  # regenerate candidates, re-measure,
                                                                # rewrite
                                                                tlmicroscope/data/tasks.jsonl

The candidates come from the word lists below with seeded distractors (other capitals; words
from other antonym pairs; wrong pluralisations; nearby numbers). ``--rebuild`` scores every
candidate with the embedded SmolLM2-135M-Instruct (3-shot prompts from the same category,
summed answer log-likelihood), drops the kinds of question it mostly gets wrong (a kind is a
category, or an operation within arithmetic, answered below ``--min-accuracy``), and draws a
seeded sample of ``--per-category`` items per category from the rest, whether the model answers
them or not. The shipped set is therefore mostly, not entirely, answered; the printed accuracy
says how much. Run it under the shared lock: it loads the embedded model.

The fixed-label categories (``sentiment``, ``yes_no``; for the injection experiment's
comparison with the paper's fixed-label tasks) are appended whole by ``fixed_label_items``, with
balanced labels and no filtering: a filter on the model's answers would make a binary task look
answerable when it is not. Their accuracy is printed with the rest.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "the United Kingdom": "London",
    "Ireland": "Dublin",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Switzerland": "Bern",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "the Czech Republic": "Prague",
    "Hungary": "Budapest",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Denmark": "Copenhagen",
    "Finland": "Helsinki",
    "Iceland": "Reykjavik",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Turkey": "Ankara",
    "Egypt": "Cairo",
    "Morocco": "Rabat",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa",
    "Ghana": "Accra",
    "Senegal": "Dakar",
    "Algeria": "Algiers",
    "Tunisia": "Tunis",
    "Libya": "Tripoli",
    "Sudan": "Khartoum",
    "Uganda": "Kampala",
    "Zimbabwe": "Harare",
    "Angola": "Luanda",
    "Japan": "Tokyo",
    "China": "Beijing",
    "South Korea": "Seoul",
    "North Korea": "Pyongyang",
    "India": "New Delhi",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "the Philippines": "Manila",
    "Malaysia": "Kuala Lumpur",
    "Nepal": "Kathmandu",
    "Afghanistan": "Kabul",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Syria": "Damascus",
    "Lebanon": "Beirut",
    "Jordan": "Amman",
    "Saudi Arabia": "Riyadh",
    "Qatar": "Doha",
    "Mongolia": "Ulaanbaatar",
    "Uzbekistan": "Tashkent",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Canada": "Ottawa",
    "the United States": "Washington",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Jamaica": "Kingston",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Chile": "Santiago",
    "Peru": "Lima",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Ecuador": "Quito",
    "Uruguay": "Montevideo",
    "Paraguay": "Asuncion",
    "Panama": "Panama City",
    "Costa Rica": "San Jose",
    "Guatemala": "Guatemala City",
    "Honduras": "Tegucigalpa",
    "Nicaragua": "Managua",
    "Haiti": "Port-au-Prince",
    "Estonia": "Tallinn",
    "Latvia": "Riga",
    "Lithuania": "Vilnius",
    "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana",
    "Albania": "Tirana",
    "Belarus": "Minsk",
    "Georgia": "Tbilisi",
    "Armenia": "Yerevan",
    "Azerbaijan": "Baku",
    "Cyprus": "Nicosia",
    "Malta": "Valletta",
    "Cambodia": "Phnom Penh",
    "Laos": "Vientiane",
    "Taiwan": "Taipei",
    "Zambia": "Lusaka",
    "Mozambique": "Maputo",
    "Madagascar": "Antananarivo",
    "Cameroon": "Yaounde",
    "Mali": "Bamako",
    "Somalia": "Mogadishu",
    "Rwanda": "Kigali",
    "Kazakhstan": "Astana",
    "Kuwait": "Kuwait City",
    "Oman": "Muscat",
    "Yemen": "Sanaa",
}

ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("tall", "short"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("up", "down"),
    ("open", "closed"),
    ("day", "night"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("hard", "soft"),
    ("early", "late"),
    ("first", "last"),
    ("full", "empty"),
    ("wet", "dry"),
    ("clean", "dirty"),
    ("loud", "quiet"),
    ("win", "lose"),
    ("push", "pull"),
    ("buy", "sell"),
    ("true", "false"),
    ("good", "bad"),
    ("thick", "thin"),
    ("inside", "outside"),
    ("above", "below"),
    ("left", "right"),
    ("north", "south"),
    ("east", "west"),
    ("love", "hate"),
    ("friend", "enemy"),
    ("question", "answer"),
    ("remember", "forget"),
    ("accept", "reject"),
    ("alive", "dead"),
    ("asleep", "awake"),
    ("cheap", "expensive"),
    ("deep", "shallow"),
    ("wide", "narrow"),
    ("sweet", "sour"),
    ("smooth", "rough"),
    ("polite", "rude"),
    ("safe", "dangerous"),
    ("easy", "difficult"),
    ("always", "never"),
    ("everything", "nothing"),
    ("maximum", "minimum"),
    ("increase", "decrease"),
    ("import", "export"),
    ("include", "exclude"),
    ("inhale", "exhale"),
    ("entrance", "exit"),
    ("victory", "defeat"),
    ("success", "failure"),
    ("positive", "negative"),
    ("ancient", "modern"),
    ("hero", "villain"),
    ("summer", "winter"),
    ("sunrise", "sunset"),
    ("black", "white"),
    ("give", "take"),
    ("laugh", "cry"),
    ("young", "old"),
    ("high", "low"),
    ("near", "far"),
    ("many", "few"),
    ("same", "different"),
    ("top", "bottom"),
    ("visible", "invisible"),
    ("possible", "impossible"),
    ("legal", "illegal"),
    ("kind", "cruel"),
    ("generous", "selfish"),
    ("healthy", "sick"),
    ("heavy", "light"),
    ("begin", "end"),
    ("arrive", "depart"),
    ("brave", "cowardly"),
    ("noisy", "silent"),
    ("floor", "ceiling"),
    ("minor", "major"),
    ("private", "public"),
    ("simple", "complex"),
    ("sharp", "blunt"),
    ("tight", "loose"),
    ("wild", "tame"),
    ("guilty", "innocent"),
    ("question", "reply"),
    ("spend", "save"),
    ("attack", "defend"),
    ("teacher", "student"),
    ("future", "past"),
    ("input", "output"),
    ("child", "adult"),
    ("melt", "freeze"),
    ("appear", "disappear"),
    ("agree", "disagree"),
    ("before", "after"),
    ("come", "go"),
]

PLURALS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("mouse", "mice"),
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("tooth", "teeth"),
    ("foot", "feet"),
    ("goose", "geese"),
    ("ox", "oxen"),
    ("person", "people"),
    ("box", "boxes"),
    ("bus", "buses"),
    ("city", "cities"),
    ("baby", "babies"),
    ("leaf", "leaves"),
    ("knife", "knives"),
    ("wife", "wives"),
    ("wolf", "wolves"),
    ("half", "halves"),
    ("shelf", "shelves"),
    ("potato", "potatoes"),
    ("tomato", "tomatoes"),
    ("hero", "heroes"),
    ("cactus", "cacti"),
    ("fungus", "fungi"),
    ("analysis", "analyses"),
    ("crisis", "crises"),
    ("phenomenon", "phenomena"),
    ("criterion", "criteria"),
    ("sheep", "sheep"),
    ("deer", "deer"),
    ("church", "churches"),
    ("dish", "dishes"),
    ("watch", "watches"),
    ("fox", "foxes"),
    ("party", "parties"),
    ("story", "stories"),
    ("lady", "ladies"),
    ("key", "keys"),
    ("toy", "toys"),
    ("day", "days"),
    ("boy", "boys"),
    ("book", "books"),
    ("car", "cars"),
    ("house", "houses"),
    ("tree", "trees"),
    ("apple", "apples"),
    ("chair", "chairs"),
    ("table", "tables"),
    ("glass", "glasses"),
    ("class", "classes"),
    ("kiss", "kisses"),
    ("wish", "wishes"),
    ("match", "matches"),
    ("brush", "brushes"),
    ("bench", "benches"),
    ("country", "countries"),
    ("family", "families"),
    ("puppy", "puppies"),
    ("cherry", "cherries"),
    ("life", "lives"),
    ("loaf", "loaves"),
    ("thief", "thieves"),
    ("calf", "calves"),
    ("louse", "lice"),
    ("nucleus", "nuclei"),
    ("bacterium", "bacteria"),
    ("thesis", "theses"),
    ("hypothesis", "hypotheses"),
    ("oasis", "oases"),
    ("piano", "pianos"),
    ("photo", "photos"),
    ("zoo", "zoos"),
    ("radio", "radios"),
    ("echo", "echoes"),
    ("roof", "roofs"),
    ("chief", "chiefs"),
    ("belief", "beliefs"),
    ("cliff", "cliffs"),
    ("berry", "berries"),
    ("army", "armies"),
    ("monkey", "monkeys"),
    ("valley", "valleys"),
    ("journey", "journeys"),
    ("bird", "birds"),
    ("pen", "pens"),
    ("cup", "cups"),
    ("door", "doors"),
    ("window", "windows"),
    ("river", "rivers"),
    ("mountain", "mountains"),
    ("horse", "horses"),
    ("flower", "flowers"),
    ("student", "students"),
    ("teacher", "teachers"),
    ("dress", "dresses"),
    ("fly", "flies"),
    ("lunch", "lunches"),
    ("peach", "peaches"),
    ("bush", "bushes"),
    ("quiz", "quizzes"),
]


def _capital_items(rng: random.Random):
    capitals = list(CAPITALS.values())
    for country, capital in CAPITALS.items():
        distract = rng.sample([c for c in capitals if c != capital], 3)
        yield f"What is the capital of {country}?", capital, distract


def _antonym_items(rng: random.Random):
    words = sorted({w for pair in ANTONYMS for w in pair})
    seen = set()
    for word, opposite in ANTONYMS:
        if word in seen:
            continue
        seen.add(word)
        related = {w for pair in ANTONYMS if word in pair or opposite in pair for w in pair}
        distract = rng.sample([w for w in words if w not in related], 3)
        yield f'What is the opposite of "{word}"?', opposite, distract


def _wrong_plurals(word: str, plural: str) -> list[str]:
    forms = [word + "s", word + "es", word, word + "en", word + "ies", word + "i"]
    if word.endswith("y"):
        forms += [word[:-1] + "ies", word + "s"]
    if word.endswith(("f", "fe")):
        forms += [word.rstrip("e")[:-1] + "ves", word + "s"]
    return [f for f in dict.fromkeys(forms) if f != plural]


def _plural_items(rng: random.Random):
    for word, plural in PLURALS:
        yield (
            f'What is the plural of "{word}"?',
            plural,
            rng.sample(_wrong_plurals(word, plural), 3),
        )


def _arithmetic_items(rng: random.Random, n: int = 300):
    seen = set()
    while len(seen) < n:
        op = rng.choice("+-x")
        if op == "+":
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            ans = a + b
        elif op == "-":
            a = rng.randint(5, 60)
            b = rng.randint(1, a - 1)
            ans = a - b
        else:
            a, b = rng.randint(2, 10), rng.randint(2, 10)
            ans = a * b
        q = f"What is {a} {'*' if op == 'x' else op} {b}?"
        if q in seen:
            continue
        seen.add(q)
        near = [ans + d for d in (-10, -2, -1, 1, 2, 10) if ans + d >= 0]
        yield q, str(ans), [str(x) for x in rng.sample(near, 3)]


def _kind(item) -> str:
    """A category, or for arithmetic the operation ("arithmetic +")."""
    if item.category != "arithmetic":
        return item.category
    return "arithmetic " + item.question.split()[3]


def candidates(seed: int = 0):
    from tlmicroscope.tasks import MultipleChoiceItem

    rng = random.Random(seed)
    gens = {
        "capitals": _capital_items(rng),
        "antonyms": _antonym_items(rng),
        "plurals": _plural_items(rng),
        "arithmetic": _arithmetic_items(rng),
    }
    items = []
    for cat, gen in gens.items():
        for question, answer, distract in gen:
            choices = [answer, *distract]
            rng.shuffle(choices)
            items.append(MultipleChoiceItem(question, tuple(choices), choices.index(answer), cat))
    return items


SENTIMENT_POSITIVE = [
    "wonderful",
    "great",
    "excellent",
    "delightful",
    "amazing",
    "lovely",
    "fantastic",
    "brilliant",
    "superb",
    "enjoyable",
    "charming",
    "beautiful",
]
SENTIMENT_NEGATIVE = [
    "terrible",
    "awful",
    "boring",
    "horrible",
    "dreadful",
    "disappointing",
    "bad",
    "poor",
    "dull",
    "painful",
    "ugly",
    "miserable",
]
SENTIMENT_NOUNS = [
    "movie",
    "film",
    "book",
    "meal",
    "food",
    "hotel",
    "service",
    "concert",
    "show",
    "album",
    "game",
    "trip",
]
# Yes/no questions of common knowledge, 40 each way (written for this set).
YES_QUESTIONS = [
    "Is fire hot?",
    "Is ice cold?",
    "Is the sun bright?",
    "Is water wet?",
    "Is snow white?",
    "Is the sky blue?",
    "Do birds have wings?",
    "Do fish live in water?",
    "Is grass green?",
    "Do cats have fur?",
    "Is a lemon sour?",
    "Is sugar sweet?",
    "Do people need sleep?",
    "Is a mountain tall?",
    "Is the night dark?",
    "Can birds fly?",
    "Do cars have wheels?",
    "Is honey sweet?",
    "Do trees have leaves?",
    "Is the ocean salty?",
    "Can fish swim?",
    "Do dogs bark?",
    "Is a giraffe tall?",
    "Is an elephant big?",
    "Is a mouse small?",
    "Do cows give milk?",
    "Do bees make honey?",
    "Is a rock hard?",
    "Is a pillow soft?",
    "Can people walk?",
    "Does the sun rise in the morning?",
    "Is summer warm?",
    "Is winter cold?",
    "Do plants need water?",
    "Is a week seven days long?",
    "Is a circle round?",
    "Do spiders have eight legs?",
    "Is coal black?",
    "Do humans have two eyes?",
    "Is a feather light?",
]
NO_QUESTIONS = [
    "Is fire cold?",
    "Is ice hot?",
    "Is the sun dark?",
    "Is water dry?",
    "Is snow black?",
    "Is the sky green?",
    "Do fish have wings?",
    "Do birds live in water?",
    "Is grass purple?",
    "Do snakes have fur?",
    "Is sugar sour?",
    "Is a lemon sweet?",
    "Can rocks talk?",
    "Is a mountain small?",
    "Is the night bright?",
    "Can dogs fly?",
    "Do cars have legs?",
    "Is salt sweet?",
    "Do rocks have leaves?",
    "Is the ocean dry?",
    "Can a cat swim underwater for a day?",
    "Do cats bark?",
    "Is a giraffe short?",
    "Is an elephant tiny?",
    "Is a mouse huge?",
    "Do chickens give milk?",
    "Do cows make honey?",
    "Is a pillow hard?",
    "Is a rock soft?",
    "Can fish walk?",
    "Does the sun rise at midnight?",
    "Is summer cold?",
    "Is winter hot?",
    "Do stones need water?",
    "Is a week two days long?",
    "Is a square round?",
    "Do spiders have two legs?",
    "Is milk black?",
    "Do humans have five eyes?",
    "Is an elephant light?",
]


def fixed_label_items(seed: int = 14):
    """The ``sentiment`` (negative/positive) and ``yes_no`` (No/Yes) items, in file order."""
    from tlmicroscope.tasks import MultipleChoiceItem

    rng = random.Random(seed)
    labels = ("negative", "positive")
    sentiment = []
    for noun in SENTIMENT_NOUNS:
        for words, answer in ((SENTIMENT_POSITIVE, 1), (SENTIMENT_NEGATIVE, 0)):
            for adj in rng.sample(words, 4):
                sentiment.append(
                    MultipleChoiceItem(
                        f'Is the review "The {noun} was {adj}." positive or negative?',
                        labels,
                        answer,
                        "sentiment",
                    )
                )
    yes_no = [MultipleChoiceItem(q, ("No", "Yes"), 1, "yes_no") for q in YES_QUESTIONS] + [
        MultipleChoiceItem(q, ("No", "Yes"), 0, "yes_no") for q in NO_QUESTIONS
    ]
    rng.shuffle(sentiment)
    rng.shuffle(yes_no)
    return sentiment + yes_no


def main() -> int:
    import torch

    from tlmicroscope.models import load_model
    from tlmicroscope.tasks import (
        ALL_CATEGORIES,
        CATEGORIES,
        accuracy,
        choice_logprobs,
        continuations,
        few_shot_prompts,
        load_tasks,
    )

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--per-category", type=int, default=75, help="items kept per category")
    ap.add_argument(
        "--min-accuracy",
        type=float,
        default=0.8,
        help="drop kinds of question the model answers less often than this",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_model()
    if args.rebuild:
        items = candidates()
        prompts = few_shot_prompts(items, n_shots=3, seed=0)
        lp = choice_logprobs(model, prompts, [continuations(it) for it in items], progress=True)
        right = (lp.argmax(-1) == torch.tensor([it.answer for it in items])).tolist()
        kinds = [_kind(it) for it in items]
        good_kinds = set()
        for kind in dict.fromkeys(kinds):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            acc = sum(right[i] for i in idx) / len(idx)
            keep = acc >= args.min_accuracy
            good_kinds |= {kind} if keep else set()
            print(
                f"{kind}: {acc:.3f} of {len(idx)} candidates answered -> "
                f"{'kept' if keep else 'dropped'}"
            )
        rng = random.Random(1)
        kept = []
        for cat in CATEGORIES:
            idx = [i for i, it in enumerate(items) if it.category == cat and kinds[i] in good_kinds]
            kept += sorted(rng.sample(idx, min(len(idx), args.per_category)))
        out = ROOT / "tlmicroscope" / "data" / "tasks.jsonl"
        fixed = fixed_label_items()
        out.write_text(
            "".join(json.dumps(items[i].to_dict()) + "\n" for i in kept)
            + "".join(json.dumps(it.to_dict()) + "\n" for it in fixed)
        )
        print(
            f"wrote {len(kept)} items to {out}; their accuracy in this measurement: "
            f"{sum(right[i] for i in kept) / len(kept):.3f}"
        )
    items = load_tasks(ALL_CATEGORIES)
    for shots in (0, 3):
        acc = accuracy(model, items, n_shots=shots, seed=123)
        print(
            f"{shots}-shot accuracy (shots seed 123) on {len(items)} items: "
            + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
