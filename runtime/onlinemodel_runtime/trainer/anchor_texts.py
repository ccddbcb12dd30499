"""The general conversations the anchor term keeps the model's answers to (trainer/anchor.py).

Everyday questions with short, plain answers: none of them is a fact users teach, and none is a question of
the continual benchmark's control set (bench/data/continual/controls.jsonl), which would make it measure
its own training data. What matters is the model's next-token distributions along these replies, not the
replies' wording: the anchor term keeps those distributions where the untouched model had them.
"""

ANCHOR_CONVERSATIONS: tuple[tuple[str, str], ...] = (
    ("Give me a synonym for the word happy.", "A synonym for happy is joyful."),
    ("Name three primary colors.", "The three primary colors are red, blue and yellow."),
    ("Write one sentence about the ocean.", "The ocean covers most of the Earth and is home to countless creatures."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("How do I boil an egg?", "Place the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("Translate 'thank you' into French.", "In French, 'thank you' is 'merci'."),
    ("What is the plural of mouse?", "The plural of mouse is mice."),
    ("Give me a tip for staying focused while studying.", "Put your phone in another room and study in short blocks with breaks."),
    ("What is the difference between weather and climate?",
     "Weather is what the air is like on a given day; climate is the usual weather of a place over many years."),
    ("Why do leaves change color in autumn?",
     "In autumn trees stop making green chlorophyll, so the yellow and red pigments in the leaves show."),
    ("Suggest a name for a pet goldfish.", "How about Bubbles?"),
    ("What does a doctor do?", "A doctor examines people, finds out why they are ill and treats them."),
    ("Explain what a computer is in one sentence.", "A computer is a machine that stores and processes information by following instructions."),
    ("What is a good way to save money?", "Set aside a fixed part of every paycheck before you spend anything."),
    ("Write a short greeting for a birthday card.", "Happy birthday! Wishing you a wonderful year ahead."),
    ("What are the four seasons?", "The four seasons are spring, summer, autumn and winter."),
    ("What is rain made of?", "Rain is made of drops of water that fall from clouds."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("Who was Cleopatra?", "Cleopatra was the last queen of ancient Egypt."),
    ("What is an adjective?", "An adjective is a word that describes a noun, such as big or blue."),
    ("Name a fruit that is red.", "A strawberry is a red fruit."),
    ("Why is exercise good for you?", "Exercise strengthens your heart and muscles and improves your mood."),
    ("What is a volcano?", "A volcano is an opening in the Earth's crust where molten rock, ash and gas escape."),
    ("How do bees help plants?", "Bees carry pollen from flower to flower, which helps plants make seeds."),
    ("What is the moon?", "The moon is the natural satellite that orbits the Earth."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("What does a library do?", "A library lends books and other materials to the public."),
    ("Describe a cat in one sentence.", "A cat is a small, furry animal with sharp claws that likes to nap."),
    ("What is the alphabet?", "The alphabet is the set of letters used to write a language."),
    ("What is a map used for?", "A map is used to find places and plan how to get from one to another."),
    ("Why do we need sleep?", "Sleep lets the body rest and repair itself and helps the brain store memories."),
    ("What is a verb?", "A verb is a word that describes an action or a state, such as run or be."),
)
