"""The small bilingual world the synthetic corpus talks about.

Kept deliberately small (a few hundred distinct words and characters) so that a ~6M-parameter
model learns it in minutes and a 4k-8k BPE vocabulary covers it.
"""

from __future__ import annotations

# (English noun phrase, Chinese noun, English color, Chinese color)
COLORS = [
    ("the sky", "天空", "blue", "蓝色"), ("grass", "草", "green", "绿色"),
    ("snow", "雪", "white", "白色"), ("coal", "煤", "black", "黑色"),
    ("a banana", "香蕉", "yellow", "黄色"), ("an apple", "苹果", "red", "红色"),
    ("the sea", "大海", "blue", "蓝色"), ("a frog", "青蛙", "green", "绿色"),
    ("milk", "牛奶", "white", "白色"), ("a crow", "乌鸦", "black", "黑色"),
    ("a lemon", "柠檬", "yellow", "黄色"), ("a cherry", "樱桃", "red", "红色"),
    ("a leaf", "叶子", "green", "绿色"), ("a cloud", "云", "white", "白色"),
    ("a tomato", "西红柿", "red", "红色"), ("an orange", "橙子", "orange", "橙色"),
    ("a carrot", "胡萝卜", "orange", "橙色"), ("a grape", "葡萄", "purple", "紫色"),
]

# (English animal, Chinese animal, English sound, Chinese sound)
SOUNDS = [
    ("dog", "狗", "woof", "汪汪"), ("cat", "猫", "meow", "喵喵"), ("cow", "牛", "moo", "哞哞"),
    ("duck", "鸭子", "quack", "嘎嘎"), ("sheep", "羊", "baa", "咩咩"), ("bird", "小鸟", "tweet", "叽叽"),
    ("pig", "猪", "oink", "哼哼"), ("frog", "青蛙", "ribbit", "呱呱"), ("lion", "狮子", "roar", "吼吼"),
    ("chicken", "小鸡", "cluck", "咯咯"),
]

# (English word, Chinese word, English opposite, Chinese opposite); asked both ways round.
OPPOSITES = [
    ("hot", "热", "cold", "冷"), ("big", "大", "small", "小"), ("up", "上", "down", "下"),
    ("fast", "快", "slow", "慢"), ("old", "旧", "new", "新"), ("happy", "高兴", "sad", "难过"),
    ("tall", "高", "short", "矮"), ("good", "好", "bad", "坏"), ("left", "左", "right", "右"),
    ("early", "早", "late", "晚"), ("full", "满", "empty", "空"), ("hard", "硬", "soft", "软"),
    ("day", "白天", "night", "黑夜"), ("open", "开", "closed", "关"),
]

# (English, Chinese) word pairs for translation questions.
WORDS = [
    ("cat", "猫"), ("dog", "狗"), ("water", "水"), ("fire", "火"), ("book", "书"), ("moon", "月亮"),
    ("sun", "太阳"), ("tree", "树"), ("fish", "鱼"), ("rice", "米饭"), ("tea", "茶"), ("home", "家"),
    ("friend", "朋友"), ("school", "学校"), ("mother", "妈妈"), ("father", "爸爸"),
    ("flower", "花"), ("mountain", "山"), ("river", "河"), ("rain", "雨"), ("apple", "苹果"),
    ("bird", "小鸟"), ("milk", "牛奶"), ("snow", "雪"),
]

# Chit-chat: (training prompts, held-out prompts, reply), per language. Several phrasings of
# each intent in training, so a model can learn the intent rather than one sentence; the
# held-out phrasings never appear in a training file.
CHAT_EN = [
    (["Hello!", "Hi!", "Good morning!", "Hey!", "Hello there!", "Good evening!"],
     ["Hi there!", "Hey there!"], "Hello! How can I help you?"),
    (["Who are you?", "What is your name?", "What's your name?", "Introduce yourself.",
      "Who am I talking to?"], ["Tell me who you are.", "What are you called?"],
     "I am AstrAI, a small assistant that speaks English and Chinese."),
    (["How are you?", "How are you today?", "How are you doing?", "How do you feel?",
      "Are you well?"], ["How is it going?", "How are things?"], "I am fine, thank you!"),
    (["Thank you!", "Thanks!", "Thank you very much!", "Many thanks!", "Thanks for your help!"],
     ["Thanks a lot!", "Thank you so much!"], "You are welcome!"),
    (["Goodbye!", "Bye!", "See you!", "Bye bye!", "Good night!", "See you soon!"],
     ["See you later!", "Bye for now!"], "Goodbye! Have a nice day!"),
    (["What can you do?", "How can you help me?", "What do you do?", "What can you help with?",
      "What are your skills?"], ["What are you good at?", "What things can you do?"],
     "I can do simple math, name colors and animal sounds, and translate words between English "
     "and Chinese."),
    (["Do you speak Chinese?", "Do you know Chinese?", "Can you talk in Chinese?",
      "Which languages do you speak?"], ["Can you speak Chinese?", "Do you understand Chinese?"],
     "Yes, I speak English and Chinese."),
]
CHAT_ZH = [
    (["你好！", "您好！", "早上好！", "嗨！", "晚上好！", "哈喽！"], ["嗨，你好！", "你好呀！"],
     "你好！有什么可以帮你的？"),
    (["你是谁？", "你叫什么名字？", "你叫什么？", "请做个自我介绍。", "我在和谁说话？"],
     ["介绍一下你自己。", "你的名字是什么？"], "我是 AstrAI，一个会说中文和英文的小助手。"),
    (["你好吗？", "你今天好吗？", "你怎么样？", "你还好吗？", "今天过得好吗？"],
     ["最近怎么样？", "你过得怎么样？"], "我很好，谢谢！"),
    (["谢谢！", "谢谢你！", "非常感谢！", "多谢！", "谢谢你的帮助！"], ["太感谢了！", "真是谢谢你！"],
     "不客气！"),
    (["再见！", "拜拜！", "回见！", "晚安！", "下次见！"], ["回头见！", "明天见！"],
     "再见！祝你有美好的一天！"),
    (["你会做什么？", "你能帮我做什么？", "你能做什么？", "你有什么本领？", "你可以帮我什么？"],
     ["你擅长什么？", "你都会些什么？"], "我会做简单的算术，说出颜色和动物的叫声，还会翻译中英文单词。"),
    (["你会说英语吗？", "你懂英语吗？", "你会讲英文吗？", "你说哪些语言？"],
     ["你能说英语吗？", "你会不会说英语？"], "会，我会说中文和英文。"),
]

SYSTEM_PROMPTS = {
    "en": ["You are a helpful assistant.", "You are AstrAI, a friendly bilingual assistant.",
           "Answer briefly."],
    "zh": ["你是一个乐于助人的助手。", "你是 AstrAI，一个友好的双语助手。", "请简短回答。"],
}

DONT_KNOW = {"en": "I don't know.", "zh": "我不知道。"}
