"""Regenerate ``zero_shot_items.jsonl`` (run: ``python sinklens/data/generate_items.py``).

Every item is written here, from small tables of public, textbook facts and hand-written
sentences; nothing is downloaded. The output is deterministic (fixed seed). See README.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20250101
OUT = Path(__file__).with_name("zero_shot_items.jsonl")


# --- facts ---------------------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Russia": "Moscow", "England": "London", "Egypt": "Cairo", "China": "Beijing", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Poland": "Warsaw", "Sweden": "Stockholm",
    "Norway": "Oslo", "Denmark": "Copenhagen", "Finland": "Helsinki", "Hungary": "Budapest",
    "Thailand": "Bangkok", "South Korea": "Seoul", "Canada": "Ottawa", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Kenya": "Nairobi", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Cuba": "Havana",
    "India": "New Delhi", "Australia": "Canberra", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "the Czech Republic": "Prague", "Chile": "Santiago", "Vietnam": "Hanoi", "the Philippines": "Manila",
    "Indonesia": "Jakarta", "Saudi Arabia": "Riyadh", "Scotland": "Edinburgh",
}

LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Japan": "Japanese",
    "China": "Chinese", "Russia": "Russian", "Brazil": "Portuguese", "Greece": "Greek", "Poland": "Polish",
    "the Netherlands": "Dutch", "Sweden": "Swedish", "Turkey": "Turkish", "Egypt": "Arabic", "South Korea": "Korean",
    "Finland": "Finnish", "Norway": "Norwegian", "Hungary": "Hungarian", "Thailand": "Thai", "Vietnam": "Vietnamese",
    "Mexico": "Spanish", "Portugal": "Portuguese", "Iran": "Persian", "Denmark": "Danish",
}

CURRENCIES = {
    "Japan": "yen", "the United States": "dollar", "the United Kingdom": "pound", "India": "rupee",
    "China": "yuan", "Russia": "ruble", "Mexico": "peso", "Switzerland": "franc", "South Korea": "won",
    "Germany": "euro", "Turkey": "lira", "South Africa": "rand",
}

LANDMARKS = {
    "The Eiffel Tower": "Paris", "The Colosseum": "Rome", "Big Ben": "London", "The Statue of Liberty": "New York",
    "The Brandenburg Gate": "Berlin", "The Kremlin": "Moscow", "The Sagrada Familia": "Barcelona",
    "The Golden Gate Bridge": "San Francisco", "The Acropolis": "Athens", "The Forbidden City": "Beijing",
    "Hollywood": "Los Angeles", "The Vatican": "Rome",
}

CONTINENTS = {
    "France": "Europe", "Japan": "Asia", "Brazil": "South America", "Egypt": "Africa", "Kenya": "Africa",
    "Canada": "North America", "Germany": "Europe", "India": "Asia", "Argentina": "South America",
    "Nigeria": "Africa", "Mexico": "North America", "China": "Asia", "Peru": "South America", "Italy": "Europe",
    "Morocco": "Africa", "Thailand": "Asia", "Chile": "South America", "Spain": "Europe", "Ghana": "Africa",
    "Vietnam": "Asia",
}

BABY_ANIMALS = {
    "dog": "puppy", "cat": "kitten", "cow": "calf", "sheep": "lamb", "horse": "foal", "duck": "duckling",
    "frog": "tadpole", "bear": "cub", "kangaroo": "joey", "pig": "piglet", "goose": "gosling", "swan": "cygnet",
}

# (context, answer, three distractors)
SCIENCE = [
    ("The largest planet in our solar system is", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("The planet closest to the Sun is", "Mercury", ["Jupiter", "Saturn", "Neptune"]),
    ("The planet known as the Red Planet is", "Mars", ["Venus", "Saturn", "Uranus"]),
    ("Water is made of hydrogen and", "oxygen", ["nitrogen", "carbon", "helium"]),
    ("The Earth revolves around the", "Sun", ["Moon", "Mars", "comet"]),
    ("The tallest mountain in the world is Mount", "Everest", ["Kilimanjaro", "Fuji", "Olympus"]),
    ("The longest river in Africa is the", "Nile", ["Amazon", "Thames", "Danube"]),
    ("The largest ocean on Earth is the", "Pacific", ["Atlantic", "Indian", "Arctic"]),
    ("The largest desert in Africa is the", "Sahara", ["Gobi", "Atacama", "Mojave"]),
    ("The hardest natural material is", "diamond", ["gold", "chalk", "glass"]),
    ("Bees collect nectar to make", "honey", ["milk", "silk", "wool"]),
    ("The largest animal that has ever lived is the blue", "whale", ["shark", "elephant", "bear"]),
    ("The fastest land animal is the", "cheetah", ["turtle", "snail", "cow"]),
    ("The organ that pumps blood through the body is the", "heart", ["liver", "lung", "stomach"]),
    ("Plants make their food from sunlight in a process called", "photosynthesis",
     ["digestion", "evaporation", "erosion"]),
    ("The natural satellite that orbits the Earth is the", "Moon", ["Sun", "Mars", "Venus"]),
    ("The gas that humans need to breathe is", "oxygen", ["helium", "neon", "argon"]),
    ("Water boils at one hundred degrees", "Celsius", ["Kelvin", "miles", "grams"]),
    ("The force that pulls objects toward the Earth is called", "gravity", ["friction", "magnetism", "pressure"]),
    ("A triangle has three", "sides", ["wheels", "legs", "doors"]),
]

PEOPLE = [
    ("Romeo and Juliet was written by William", "Shakespeare", ["Wordsworth", "Blake", "Golding"]),
    ("The theory of relativity was developed by Albert", "Einstein", ["Newton", "Darwin", "Edison"]),
    ("The first person to walk on the Moon was Neil", "Armstrong", ["Young", "Diamond", "Gaiman"]),
    ("The telephone was invented by Alexander Graham", "Bell", ["Smith", "Jones", "Brown"]),
    ("The theory of evolution by natural selection was proposed by Charles", "Darwin",
     ["Dickens", "Babbage", "Chaplin"]),
    ("The laws of motion and universal gravitation were described by Isaac", "Newton",
     ["Asimov", "Stern", "Hayes"]),
    ("The first President of the United States was George", "Washington", ["Lincoln", "Jefferson", "Adams"]),
    ("The Harry Potter books were written by J. K.", "Rowling", ["Tolkien", "Austen", "Orwell"]),
    ("The Mona Lisa was painted by Leonardo da", "Vinci", ["Silva", "Costa", "Luca"]),
    ("The composer of the Moonlight Sonata was Ludwig van", "Beethoven", ["Mozart", "Bach", "Chopin"]),
]


def _pick_distractors(rng: random.Random, answer: str, pool: list[str], n: int = 3) -> list[str]:
    options = sorted({p for p in pool if p != answer})
    return rng.sample(options, n)


def facts(rng: random.Random) -> list[dict]:
    items = []
    tables = [
        ("capital", CAPITALS, "The capital of {} is"),
        ("language", LANGUAGES, "In {}, most people speak"),
        ("currency", CURRENCIES, "The currency of {} is the"),
        ("landmark", LANDMARKS, "{} is in the city of"),
        ("continent", CONTINENTS, "{} is a country in"),
        ("baby_animal", BABY_ANIMALS, "A baby {} is called a"),
    ]
    for family, table, template in tables:
        pool = list(table.values())
        for subject, answer in table.items():
            items.append(_item(rng, "facts", family, template.format(subject), answer,
                               _pick_distractors(rng, answer, pool)))
    for family, rows in (("science", SCIENCE), ("people", PEOPLE)):
        for context, answer, wrong in rows:
            items.append(_item(rng, "facts", family, context, answer, wrong))
    return items


# --- commonsense ---------------------------------------------------------------------------------

WORKPLACES = {
    "doctor": "hospital", "teacher": "school", "chef": "kitchen", "librarian": "library", "banker": "bank",
    "mechanic": "garage", "scientist": "laboratory", "pharmacist": "pharmacy", "baker": "bakery",
    "farmer": "field", "waiter": "restaurant", "judge": "courtroom",
}

TOOLS = {
    "write a letter": "pen", "sweep the floor": "broom", "dig a hole": "shovel", "hammer a nail": "hammer",
    "open a locked door": "key", "eat soup": "spoon", "brush your teeth": "toothbrush",
    "see in the dark": "flashlight", "stay dry in the rain": "umbrella", "take a photo": "camera",
    "boil water": "kettle", "measure a length": "ruler", "cut a tree": "saw", "cut bread": "knife",
    "dry yourself after a shower": "towel", "find your way in a new city": "map",
    "reach a high shelf": "ladder", "sew on a button": "needle", "look at distant stars": "telescope",
    "rest your head at night": "pillow",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
    "open": "closed", "old": "young", "tall": "short", "wet": "dry", "rich": "poor", "early": "late",
    "hard": "soft", "full": "empty", "loud": "quiet", "left": "right", "black": "white", "good": "bad",
    "strong": "weak", "win": "lose", "push": "pull", "inside": "outside",
}

BODY = [
    ("We see with our", "eyes", ["ears", "elbows", "knees"]),
    ("We hear with our", "ears", ["eyes", "toes", "elbows"]),
    ("We smell with our", "noses", ["knees", "elbows", "ears"]),
    ("We taste food with our", "tongues", ["elbows", "ears", "knees"]),
    ("We walk on our", "feet", ["hands", "heads", "ears"]),
    ("We chew food with our", "teeth", ["ears", "eyes", "elbows"]),
    ("We hold a pencil with our", "fingers", ["toes", "ears", "knees"]),
]

SITUATIONS = [
    ("It was snowing outside, so she put on her warm", "coat", ["swimsuit", "sandals", "sunglasses"]),
    ("It started to rain, so he opened his", "umbrella", ["fridge", "wallet", "laptop"]),
    ("The room was dark, so she turned on the", "light", ["oven", "tap", "shower"]),
    ("He was thirsty, so he drank a glass of", "water", ["sand", "paper", "glue"]),
    ("She was hungry, so she ate a", "sandwich", ["shoe", "rock", "pencil"]),
    ("The baby was tired, so she went to", "sleep", ["work", "war", "college"]),
    ("The ice cream melted because the day was very", "hot", ["cold", "quiet", "short"]),
    ("He put the milk back in the", "fridge", ["oven", "bathtub", "mailbox"]),
    ("She washed the dirty dishes in the kitchen", "sink", ["bed", "closet", "garden"]),
    ("After a long day of hard work, he felt very", "tired", ["energetic", "purple", "tall"]),
    ("The glass fell on the stone floor and", "broke", ["sang", "grew", "laughed"]),
    ("To cross the river, they took a", "boat", ["pillow", "spoon", "carpet"]),
    ("The children built a snowman in the", "winter", ["summer", "oven", "library"]),
    ("We wear sunglasses when it is", "sunny", ["dark", "midnight", "foggy"]),
    ("At night, we can see the moon and the", "stars", ["sun", "rainbow", "clouds"]),
    ("The happy dog wagged its", "tail", ["wings", "fins", "horns"]),
    ("Fish live in the", "water", ["trees", "sand", "fire"]),
    ("Birds build their", "nests", ["houses", "cars", "roads"]),
    ("Cows give us", "milk", ["wool", "eggs", "honey"]),
    ("Chickens lay", "eggs", ["milk", "wool", "honey"]),
    ("When the traffic light turns red, the cars", "stop", ["fly", "swim", "sing"]),
    ("She planted the seeds in the", "garden", ["oven", "car", "bathtub"]),
    ("He paid for his groceries with", "money", ["sand", "leaves", "water"]),
    ("A week has seven", "days", ["hours", "months", "years"]),
    ("An hour has sixty", "minutes", ["days", "years", "weeks"]),
    ("A day has twenty-four", "hours", ["minutes", "days", "weeks"]),
    ("A year has twelve", "months", ["days", "minutes", "hours"]),
    ("The phone battery was empty, so he plugged in the", "charger", ["toaster", "mirror", "blanket"]),
    ("She could not read the small letters, so she put on her", "glasses", ["boots", "gloves", "scarf"]),
    ("The plant was dying because nobody gave it any", "water", ["music", "homework", "paint"]),
    ("He missed the bus, so he was late for", "work", ["yesterday", "breakfast", "sleep"]),
    ("The kettle whistled because the water was", "boiling", ["frozen", "green", "asleep"]),
]


def commonsense(rng: random.Random) -> list[dict]:
    items = []
    tables = [
        ("workplace", WORKPLACES, "A {} usually works in a"),
        ("tool", TOOLS, "To {}, you use a"),
        ("opposite", OPPOSITES, "The opposite of {} is"),
    ]
    for family, table, template in tables:
        pool = list(table.values())
        for subject, answer in table.items():
            wrong = _pick_distractors(rng, answer, pool + (list(table) if family == "opposite" else []))
            if family == "opposite":
                wrong = [w for w in wrong if w != subject][:3]
                while len(wrong) < 3:
                    extra = rng.choice(pool)
                    if extra not in wrong and extra not in (answer, subject):
                        wrong.append(extra)
            items.append(_item(rng, "commonsense", family, template.format(subject), answer, wrong))
    for family, rows in (("body", BODY), ("situation", SITUATIONS)):
        for context, answer, wrong in rows:
            items.append(_item(rng, "commonsense", family, context, answer, wrong))
    return items


# --- arithmetic ----------------------------------------------------------------------------------

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def _numeric_distractors(rng: random.Random, answer: int, low: int = 0, spread: int = 3) -> list[int]:
    options = [answer + d for d in range(-spread, spread + 1) if d != 0 and answer + d >= low]
    return rng.sample(options, 3)


def _unique(make, count: int) -> list[dict]:
    """``count`` items from ``make()`` with distinct contexts."""
    items, seen = [], set()
    while len(items) < count:
        item = make()
        if item["context"] not in seen:
            seen.add(item["context"])
            items.append(item)
    return items


def _worked(rng: random.Random, op: str, first: tuple[int, int], second: tuple[int, int], n: int = 2) -> str:
    """``n`` solved examples of ``op`` (one per line), operands drawn from the ranges ``first``/``second``."""
    lines = []
    for _ in range(n):
        a, b = rng.randint(*first), rng.randint(*second)
        if op == "-" and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "x": a * b}[op]
        lines.append(f"{a} {op} {b} = {value}")
    return "\n".join(lines) + "\n"


def arithmetic(rng: random.Random) -> list[dict]:
    """Each context shows two solved examples of the operation, then the question (``a op b =``).
    Without the examples SmolLM2-135M is at chance on bare ``a + b =`` (measured; see README)."""
    def addition():
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return _item(rng, "arithmetic", "addition", _worked(rng, "+", (1, 9), (1, 9)) + f"{a} + {b} =", str(a + b),
                     [str(x) for x in _numeric_distractors(rng, a + b)])

    def addition_2digit():
        a, b = rng.randint(10, 40), rng.randint(1, 9)
        return _item(rng, "arithmetic", "addition_2digit", _worked(rng, "+", (10, 40), (1, 9)) + f"{a} + {b} =",
                     str(a + b), [str(x) for x in _numeric_distractors(rng, a + b)])

    def multiplication():
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return _item(rng, "arithmetic", "multiplication", _worked(rng, "x", (2, 9), (2, 9)) + f"{a} x {b} =",
                     str(a * b), [str(x) for x in _numeric_distractors(rng, a * b, spread=4)])

    def subtraction():
        a = rng.randint(2, 9)
        b = rng.randint(1, a - 1)
        return _item(rng, "arithmetic", "subtraction", _worked(rng, "-", (1, 9), (1, 9)) + f"{a} - {b} =", str(a - b),
                     [str(x) for x in _numeric_distractors(rng, a - b)])

    items = []
    for make, count in ((addition, 30), (addition_2digit, 25), (multiplication, 30), (subtraction, 15)):
        items += _unique(make, count)
    return items


# --- sequences -----------------------------------------------------------------------------------

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]
SEASONS = ["spring", "summer", "autumn", "winter"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def _cyclic(rng, family, words, shown, starts, wrap=True):
    items = []
    n = len(words)
    for start in starts:
        seq = [words[(start + i) % n] for i in range(shown + 1)] if wrap else words[start:start + shown + 1]
        answer = seq[-1]
        pool = [w for w in words if w not in seq]
        if len(pool) < 3:  # short cycles (seasons): the shown words are the distractors
            pool = [w for w in words if w != answer]
        items.append(_item(rng, "sequences", family, ", ".join(seq[:-1]) + ",", answer, rng.sample(pool, 3)))
    return items


def sequences(rng: random.Random) -> list[dict]:
    items = []
    items += _cyclic(rng, "days", DAYS, 3, range(7))
    items += _cyclic(rng, "months", MONTHS, 3, range(12))
    items += _cyclic(rng, "seasons", SEASONS, 3, range(4))
    items += _cyclic(rng, "ordinals", ORDINALS, 3, range(6), wrap=False)
    items += _cyclic(rng, "counting_words", NUMBER_WORDS[1:], 3, range(0, 9), wrap=False)
    items += _cyclic(rng, "letters", LETTERS, 4, rng.sample(range(0, 21), 12), wrap=False)
    for family, step, count, low in (("count_1", 1, 12, 1), ("count_2", 2, 10, 2), ("count_5", 5, 8, 5),
                                     ("count_10", 10, 8, 10), ("count_down", -1, 10, 8)):
        for start in rng.sample(range(low, 41), count):
            seq = [start + i * step for i in range(5)]
            answer = seq[-1]
            wrong = [answer + step, answer - step, answer + (1 if abs(step) != 1 else 2)]
            items.append(_item(rng, "sequences", family, ", ".join(map(str, seq[:-1])) + ",", str(answer),
                               [str(w) for w in wrong]))
    return items


# --- assembly ------------------------------------------------------------------------------------

def _item(rng: random.Random, task: str, family: str, context: str, answer: str, wrong: list[str]) -> dict:
    choices = [answer] + [w for w in wrong]
    assert len(set(choices)) == len(choices), (context, choices)
    order = list(range(len(choices)))
    rng.shuffle(order)
    return {"task": task, "family": family, "context": context,
            "choices": [" " + choices[i] for i in order], "gold": order.index(0)}


def build() -> list[dict]:
    rng = random.Random(SEED)
    items = []
    for make in (facts, commonsense, arithmetic, sequences):
        block = make(rng)
        for n, item in enumerate(block):
            items.append({"id": f"{item['task']}-{n:03d}", **item})
    return items


def main() -> None:
    items = build()
    with open(OUT, "w", encoding="ascii") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=True) + "\n")
    counts = {}
    for item in items:
        counts[item["task"]] = counts.get(item["task"], 0) + 1
    print(f"wrote {len(items)} items to {OUT}: {counts}")


if __name__ == "__main__":
    main()
