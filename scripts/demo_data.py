"""Synthetic multi-turn chats for the demo model: the user states facts (names, cities, numbers, colours, pets,
codes, variables), chats a little, and asks about each fact one to four turns later; the assistant acknowledges
statements and answers questions from the history. Values come from large sets and every conversation mixes them
at random, so the answers can only be copied from the conversation, never memorised.

    conversation = make_conversation(random.Random(seed))
    {"system": str | None, "turns": [{"user": str, "assistant": str}, ...], "questions": [turn indices]}
"""

import random
from collections.abc import Callable
from dataclasses import dataclass


def _words(text: str) -> list[str]:
    return text.split()


NAMES = _words("""
Aaron Abigail Adam Adrian Ahmed Aisha Alan Albert Alex Alice Amelia Amir Amy Ana Andrea Andrew Angela Anna Anne
Anton Arthur Ava Barbara Ben Bella Bernard Beth Bianca Bill Bob Boris Brian Bruno Caleb Carl Carla Carlos Carmen
Caroline Chen Chloe Chris Claire Clara Colin Connor Daisy Daniel Dara David Dean Diana Diego Dmitri Dora Dylan Edgar
Edith Eduardo Elena Eli Elias Eliza Ella Emil Emily Emma Eric Erik Ethan Eva Felix Fiona Frank Freya Gabriel Gemma
George Grace Greta Hana Hannah Harry Hassan Hector Helen Henry Hugo Ian Ida Igor Ines Iris Isaac Isabel Ivan Jack
Jacob James Jane Jasmine Jason Jean Jenny Jesse Joan Joe John Jonas Jorge Jose Joy Julia Julian June Kai Karen Karl
Kate Kevin Kim Kira Lara Laura Leah Lena Leo Leon Lily Linda Lisa Liam Lola Lucas Lucy Luis Luke Luna Maria Mark
Marta Martin Mary Mason Max Maya Mia Michael Miguel Mila Milo Mina Mohammed Molly Nadia Nina Noah Nora Olga Oliver
Olivia Omar Oscar Owen Pablo Paul Paula Pedro Peter Petra Philip Priya Rachel Rafael Raj Ravi Rita Robert Robin
Rosa Ruby Ruth Ryan Sam Sara Sean Simon Sofia Sophie Stella Stefan Susan Tara Ted Theo Thomas Tina Tom Uma Vera
Victor Viktor Violet Walter Wendy Will Xavier Yara Yuki Yusuf Zack Zara Zoe Abel Ada Agnes Alma Ari Astrid Axel Basil
Bea Cedric Celia Cleo Cyrus Dex Dina Ebony Edwin Elsa Enzo Ezra Faye Finn Flora Gus Hazel Ike Ivy Jade Jude Kara
Lars Levi Lina Lyra Mabel Milan Nell Nico Odin Otto Pia Quinn Reza Rhea Rocco Rufus Sage Silas Tess Toby Ugo Vince
Wade Wren Yves Zelda Pip Rex Bear Coco Ziggy Biscuit Pepper Shadow Tiger Buddy Lucky Ginger Whiskers Smokey Nugget
""")

CITIES = """
Paris|London|Berlin|Madrid|Rome|Lisbon|Dublin|Vienna|Prague|Warsaw|Budapest|Athens|Oslo|Stockholm|Helsinki|
Copenhagen|Amsterdam|Brussels|Zurich|Geneva|Munich|Hamburg|Milan|Naples|Venice|Florence|Barcelona|Seville|Valencia|
Porto|Lyon|Marseille|Nice|Bordeaux|Krakow|Riga|Tallinn|Vilnius|Kiev|Minsk|Moscow|Istanbul|Ankara|Cairo|Tunis|
Algiers|Casablanca|Lagos|Accra|Dakar|Nairobi|Kampala|Addis Ababa|Cape Town|Durban|Johannesburg|Luanda|Harare|
Tokyo|Osaka|Kyoto|Seoul|Busan|Beijing|Shanghai|Shenzhen|Hong Kong|Taipei|Manila|Hanoi|Bangkok|Jakarta|Singapore|
Kuala Lumpur|Delhi|Mumbai|Chennai|Kolkata|Dhaka|Karachi|Lahore|Kabul|Tehran|Baghdad|Dubai|Doha|Riyadh|Amman|
Beirut|Jerusalem|Baku|Tbilisi|Yerevan|Tashkent|Almaty|Sydney|Melbourne|Perth|Brisbane|Adelaide|Auckland|
Wellington|New York|Boston|Chicago|Denver|Seattle|Portland|Austin|Dallas|Houston|Miami|Atlanta|Detroit|Phoenix|
Las Vegas|Los Angeles|San Diego|San Francisco|Toronto|Montreal|Vancouver|Ottawa|Calgary|Mexico City|Havana|
Bogota|Lima|Quito|Caracas|Santiago|Buenos Aires|Montevideo|Sao Paulo|Rio|Brasilia|Recife|Glasgow|Edinburgh|
Cardiff|Belfast|Leeds|Bristol|Oxford|Cambridge|York|Bath|Leipzig|Dresden|Cologne|Bonn|Graz|Salzburg|Bern|Basel|
Turin|Genoa|Bologna|Palermo|Malaga|Bilbao|Granada|Toulouse|Nantes|Lille|Ghent|Bruges|Antwerp|Utrecht|Bergen|
Malmo|Gdansk|Sofia|Belgrade|Zagreb|Split|Ljubljana|Sarajevo|Bucharest|Odessa|Reykjavik|Nagoya|Sapporo|Hobart|Cusco
""".replace("\n", "").split("|")

COLOURS = _words("""
red blue green yellow orange purple pink brown black white grey silver gold violet indigo teal cyan magenta maroon
navy olive beige ivory coral crimson scarlet amber lime mint turquoise lavender lilac peach tan khaki ruby emerald
jade cream plum rose salmon ochre bronze copper charcoal
""")

ANIMALS = _words("""
cat dog fish bird horse rabbit hamster parrot turtle snake goat pig cow mouse lizard duck frog pony donkey sheep
""")

THINGS = _words("""
door gate safe locker garage bike laptop phone office wifi alarm bank card vault desk drawer box chest cabinet car
boat shed attic basement studio lab gym pool club room suite flat house cabin tent trunk case bag printer router
server account email portal tablet camera radio tv fridge oven locket diary wallet panel lift elevator roof garden
barn stable tower church school library museum hotel cinema theatre station platform bus train tram plane ship
truck van scooter kiosk store shop market bakery cafe bar lounge hall porch yard fence mailbox parcel chip badge
pass ticket file folder archive disk drive cloud app game console piano guitar drum violin clock watch helmet
""")

VARIABLES = _words("""
x y z a b c n k m p q t w speed size total count limit price score level width height depth rate offset weight
length delta alpha beta gamma sigma radius angle volume budget index steps
""")

JOBS = _words("""
teacher doctor nurse pilot farmer baker chef lawyer painter writer singer dancer driver plumber builder engineer
designer dentist banker sailor soldier actor artist student waiter cook tailor barber clerk gardener miner
fisher judge poet vet coach guard cleaner florist librarian
""")

THINGS_LIKED = _words("""
tea coffee music books films pizza pasta rice soup chess football tennis hiking cooking painting dancing
swimming cycling jazz rain snow summer winter bread cheese apples bananas chocolate
""")

SMALL_TALK = [
    ("How are you?", "Fine, thanks."),
    ("Hello!", "Hello! How can I help?"),
    ("Hi there.", "Hi! How can I help?"),
    ("Thank you.", "You are welcome."),
    ("Thanks a lot.", "You are welcome."),
    ("Nice weather today.", "Yes, it is lovely."),
    ("Can you help me?", "Of course."),
    ("Are you there?", "Yes, I am here."),
]

MAX_CHARS = 700  # of a conversation's turns: about 400 tokens with the demo tokenizer

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant with a good memory.",
    "Answer briefly.",
    "You are a helpful assistant. Answer briefly.",
]


@dataclass(frozen=True)
class Fact:
    """A statement, its acknowledgement, and the question that asks for it later with its only right answer.
    `key` says what the fact is about: two facts in one conversation never share a key."""

    key: str
    statement: str
    ack: str
    question: str
    answer: str


def _name(rng: random.Random) -> Fact:
    name = rng.choice(NAMES)
    return Fact(
        "name", f"My name is {name}.", f"Nice to meet you, {name}.", "What is my name?", f"Your name is {name}."
    )


def _friend(rng: random.Random) -> Fact:
    name = rng.choice(NAMES)
    return Fact(
        "friend", f"My best friend is {name}.", "Noted.", "Who is my best friend?", f"Your best friend is {name}."
    )


def _city(rng: random.Random) -> Fact:
    city = rng.choice(CITIES)
    return Fact("city", f"I live in {city}.", "Noted.", "Where do I live?", f"You live in {city}.")


def _number(rng: random.Random) -> Fact:
    n = rng.randrange(10000)
    return Fact(
        "number",
        f"My favourite number is {n}.",
        "Got it.",
        "What is my favourite number?",
        f"Your favourite number is {n}.",
    )


def _colour(rng: random.Random) -> Fact:
    colour = rng.choice(COLOURS)
    return Fact(
        "colour",
        f"My favourite colour is {colour}.",
        "Got it.",
        "What is my favourite colour?",
        f"Your favourite colour is {colour}.",
    )


def _job(rng: random.Random) -> Fact:
    job = rng.choice(JOBS)
    return Fact("job", f"My job is {job}.", "Noted.", "What is my job?", f"Your job is {job}.")


def _pet(rng: random.Random) -> Fact:
    animal, name = rng.choice(ANIMALS), rng.choice(NAMES)
    return Fact(
        f"pet {animal}",
        f"My {animal} is called {name}.",
        "Noted.",
        f"What is my {animal} called?",
        f"Your {animal} is called {name}.",
    )


def _code(rng: random.Random) -> Fact:
    thing, n = rng.choice(THINGS), rng.randrange(10000)
    return Fact(
        f"code {thing}",
        f"The code for {thing} is {n}.",
        "Got it.",
        f"What is the code for {thing}?",
        f"The code for {thing} is {n}.",
    )


def _variable(rng: random.Random) -> Fact:
    var, n = rng.choice(VARIABLES), rng.randrange(10000)
    return Fact(f"var {var}", f"Let {var} = {n}.", "OK.", f"What is {var}?", f"{var} = {n}.")


# Fact makers and their weights: codes and pets may occur several times (with different keys).
FACT_MAKERS: list[tuple[Callable[[random.Random], Fact], float]] = [
    (_name, 1.0),
    (_friend, 0.7),
    (_city, 1.0),
    (_number, 1.0),
    (_colour, 1.0),
    (_job, 0.7),
    (_pet, 1.2),
    (_code, 2.0),
    (_variable, 1.2),
]


def make_filler(rng: random.Random) -> tuple[str, str]:
    """A turn that states nothing to remember: small talk, or an echo that copies a few words and numbers from
    the same turn (plenty of copying is what teaches a small model to copy from further back)."""
    if rng.random() < 0.4:
        pools = [NAMES, CITIES, THINGS, COLOURS, ANIMALS, [str(rng.randrange(10000))]]
        words = " ".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 4)))
        return f"Repeat after me: {words}.", f"{words}."
    if rng.random() < 0.25:
        return f"I like {rng.choice(THINGS_LIKED)}.", "Good to know."
    return rng.choice(SMALL_TALK)


def make_facts(rng: random.Random, count: int) -> list[Fact]:
    """`count` facts with distinct keys."""
    makers, weights = zip(*FACT_MAKERS, strict=True)
    facts: dict[str, Fact] = {}
    while len(facts) < count:
        fact = rng.choices(makers, weights)[0](rng)
        facts.setdefault(fact.key, fact)
    return list(facts.values())


def make_conversation(rng: random.Random, facts: tuple[int, int] = (3, 6), filler_rate: float = 0.25) -> dict:
    """Between facts[0] and facts[1] facts, each asked for 1-4 turns after it was stated, with filler turns mixed
    in; the rare draw longer than MAX_CHARS is drawn again."""
    while True:
        conversation = _draw_conversation(rng, facts, filler_rate)
        if sum(len(turn["user"]) + len(turn["assistant"]) for turn in conversation["turns"]) <= MAX_CHARS:
            return conversation


def _draw_conversation(rng: random.Random, facts: tuple[int, int], filler_rate: float) -> dict:
    """Each stated fact books a distinct later turn for its question, so no question ever waits longer than four
    turns; a fact is only stated when a free turn within reach is left to book."""
    pending = make_facts(rng, rng.randint(*facts))
    turns: list[dict] = []
    questions: list[int] = []
    booked: dict[int, Fact] = {}  # turn index -> the fact asked there
    while pending or booked:
        t = len(turns)
        free = [t + d for d in range(1, 5) if t + d not in booked]
        if t in booked:
            fact = booked.pop(t)
            questions.append(t)
            turns.append({"user": fact.question, "assistant": fact.answer})
        elif pending and free and rng.random() >= filler_rate:
            fact = pending.pop()
            booked[rng.choice(free)] = fact
            turns.append({"user": fact.statement, "assistant": fact.ack})
        else:
            user, assistant = make_filler(rng)
            turns.append({"user": user, "assistant": assistant})
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.5 else None
    return {"system": system, "turns": turns, "questions": questions}


def to_messages(conversation: dict, upto: int | None = None, history: bool = True) -> list[dict]:
    """Chat messages for a conversation: all its turns, or (with `upto`) the turns before `upto` plus that turn's
    user message, ready for a generation prompt. Without `history`, only that user message (and the system
    prompt) is kept."""
    turns = conversation["turns"]
    messages = [{"role": "system", "content": conversation["system"]}] if conversation["system"] else []
    previous = turns if upto is None else turns[:upto] if history else []
    for turn in previous:
        messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["assistant"]}]
    if upto is not None:
        messages.append({"role": "user", "content": turns[upto]["user"]})
    return messages


def held_out_conversations(count: int, seed: int = 1234) -> list[dict]:
    """Evaluation conversations from their own seed (training draws from others)."""
    rng = random.Random(seed)
    return [make_conversation(rng) for _ in range(count)]
