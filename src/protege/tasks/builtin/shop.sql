-- A small shop database for protege's built-in text-to-SQL task (written for this project).
CREATE TABLE customers (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  city TEXT NOT NULL,
  joined_year INTEGER NOT NULL
);
CREATE TABLE products (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  category TEXT NOT NULL,
  price REAL NOT NULL
);
CREATE TABLE orders (
  id INTEGER PRIMARY KEY,
  customer_id INTEGER NOT NULL REFERENCES customers(id),
  product_id INTEGER NOT NULL REFERENCES products(id),
  quantity INTEGER NOT NULL,
  order_year INTEGER NOT NULL
);
INSERT INTO customers VALUES
  (1, 'Alice', 'London', 2019), (2, 'Bruno', 'Paris', 2020), (3, 'Chen', 'London', 2021),
  (4, 'Dana', 'Berlin', 2019), (5, 'Emeka', 'Lagos', 2022), (6, 'Fatima', 'Paris', 2021),
  (7, 'Goran', 'Berlin', 2023), (8, 'Hana', 'Tokyo', 2020);
INSERT INTO products VALUES
  (1, 'Notebook', 'stationery', 3.5), (2, 'Pen', 'stationery', 1.2), (3, 'Desk Lamp', 'home', 24.0),
  (4, 'Mug', 'home', 8.0), (5, 'Headphones', 'electronics', 59.0), (6, 'Charger', 'electronics', 19.0),
  (7, 'Backpack', 'bags', 45.0), (8, 'Tote Bag', 'bags', 12.0),
  (9, 'Stapler', 'stationery', 6.5);
INSERT INTO orders VALUES
  (1, 1, 1, 3, 2022), (2, 1, 5, 1, 2023), (3, 2, 2, 10, 2022), (4, 3, 3, 1, 2023),
  (5, 3, 4, 2, 2023), (6, 4, 7, 1, 2021), (7, 5, 6, 2, 2023), (8, 6, 8, 4, 2022),
  (9, 6, 1, 5, 2023), (10, 8, 5, 2, 2022), (11, 2, 4, 1, 2023), (12, 4, 2, 6, 2022);
